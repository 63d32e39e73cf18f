"""What users read: per-layer tables for people, JSON and Markdown (`tables`), deterministic PNG
pictures (`plots`) and self-contained HTML pages (`pages`)."""

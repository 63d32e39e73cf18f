"""Training with H-matrices: trainable layers and a rank penalty (`layers`), the paper's dynamic
recompression (`dynamic`), fine-tuning a compressed file (`finetune`) and recalibrating the
tensors a file stores exactly (`recalibrate`)."""

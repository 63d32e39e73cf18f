"""The numerical core: a dense matrix in, a packed `HMatrix` within its error budget out.

`build.compress_matrix` is the one entry point. It builds the candidate blocks (`candidates`),
prices every way of storing them (`codecs`), chooses leaves under the budget (`plans`), packs and
measures the result (`build`, `bounds`); `stats` turns a built matrix into the report's figures
and `verdicts` re-checks recorded figures and quality gates. Nothing here reads files or prints.
"""

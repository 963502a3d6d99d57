"""`python -m elleci.algos.merging CONFIG.json`: run the merge a config file describes (see merge_config)."""
from elleci.algos.merging.merge_config import main

main()

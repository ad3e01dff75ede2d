"""The small ViDoRe-shaped task the evaluation tests share: the embedded page corpus at 6 pages and 8
queries (conftest's `corpus_root` builds it once per test process), registered as mteb's tiny task."""

N_PAGES, N_QUERIES = 6, 8
TASK = "ColQuantTinyPagesRetrieval"

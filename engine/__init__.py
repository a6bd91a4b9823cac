"""WorldStereo Studio inference engine (no UI code).

numpy's and scipy's OpenBLAS run on one thread here. The engine's numpy products are small ([N,3] points by 3x3
matrices and the like): spread over OpenBLAS's threads, 400 of them took 2.6 s on 2 cores against 0.3 s on one, and
two of the loop's threads doing them at once (the clip writer beside the next clip, or beside the page's viewer)
stalled for minutes while OpenBLAS's threads waited on each other. torch keeps its own threads.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # an OpenBLAS loaded after this (scipy's own) reads it


def _one_blas_thread() -> None:
    """Limit the BLAS libraries already loaded (numpy imported before the engine: the app, pytest)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


_one_blas_thread()

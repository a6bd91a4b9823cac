"""More than one GPU for one clip: the sequence-parallel group.

Rank 0 runs everything a clip needs besides the transformer's forwards — depth, the 3D cache and its renders,
retrieval, the text/image encoders and the VAE, the sampler, every output file and all progress — and the other
ranks hold only the transformer. For every forward, rank 0 sends its inputs to the others (a small
control message over gloo, the tensors over the default backend: NCCL between GPUs), and all ranks run that forward
together, split along the tokens (`engine.models.parallel`: diffusers' context parallelism, Ulysses degree = ranks).
The noise is drawn on rank 0 from the clip's seed and reaches the others inside the forward's inputs, so a seed
gives the same clip as on one GPU. Two ways to start a group:

- ``torchrun --nproc-per-node N -m engine generate ...``: `engine.cli` calls `run_launched`; rank 0 runs the
  command, the other ranks `follow` until rank 0 is done.
- ``python app.py --gpus 0,1,...``: the app is rank 0 and starts the other ranks as worker processes
  (`start_group`), which stop with it.

A failure on any rank ends every rank with one sentence: the failing rank prints it and posts it to the group's
store, rank 0 stays silent when a peer's failure broke its forward, and torchrun (or the app) ends the rest. An input
error raised by the forward itself (`InputError`) happens alike on every rank; rank 0 reports it and the group goes
on. (One pipeline per GPU, for throughput, is `engine.generators.GpuPool`.)
"""
from __future__ import annotations

import atexit
import gc
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from engine.runtime.base import Backend

# Control messages wait as long as rank 0 spends between forwards: a server may idle for days.
CONTROL_TIMEOUT = timedelta(days=3650)
FAILURE_KEY = "worldstereo/failure"
PEER_FAILURE_WAIT_S = 3.0  # how long rank 0 looks for a peer's failure note after its own forward broke
STOP_WAIT_S = 30.0


class GroupError(ValueError):
    """A multi-GPU set-up that cannot run as asked; the message is one sentence."""


class PeerFailed(BaseException):
    """Rank 0's forward broke because another rank failed; that rank has printed the reason. A BaseException, so it
    passes the engine's error handlers (which would print a second sentence) and only ends the command."""


def launched() -> bool:
    """Whether this process is one rank of several started by torchrun (or another launcher that sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _sentence(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _quiet() -> None:
    """Ranks other than 0 print nothing but their own failure: library warnings and notices are muted."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torch", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------- the group
class Group:
    """This process's place in a sequence-parallel group and the channel from rank 0 to the others."""

    def __init__(self, rank: int, world: int, device: torch.device, processes: Sequence[subprocess.Popen] = (),
                 closing: Optional[threading.Event] = None):
        self.rank, self.world, self.device = rank, world, device
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.lock = threading.Lock()
        self.broken = False
        self.closing = closing or threading.Event()  # set once the group is being closed on purpose
        self.processes = list(processes)
        self._ids = itertools.count()
        self._on_close: list[Callable[[], None]] = []  # drop what holds the group's process groups (stop_group)

    # ---- rank 0 → others
    def send(self, kind: str, body=None) -> None:
        dist.broadcast_object_list([(kind, body)], src=0, group=self.control)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def send_tensors(self, tensors: dict) -> None:
        for t in tensors.values():
            dist.broadcast(t.to(self.device).contiguous(), src=0)

    def receive_tensors(self, shapes: list) -> dict:
        out = {}
        for name, shape, dtype in shapes:
            out[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            dist.broadcast(out[name], src=0)
        return out

    def gather_errors(self, error: Optional[str]) -> list:
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.control)
        return errors

    # ---- failures: a note in the group's key-value store (torchrun's, or the app's TCP store), which works while
    # the collectives are stuck
    @staticmethod
    def _store():
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()

    def post_failure(self, sentence: str) -> None:
        try:
            self._store().set(FAILURE_KEY, sentence)
        except Exception:
            pass  # the note only keeps rank 0 quiet; the failing rank prints its sentence anyway

    def posted_failure(self, wait_s: float = 0.0) -> Optional[str]:
        try:
            store = self._store()
            deadline = time.monotonic() + wait_s
            while True:
                if store.check([FAILURE_KEY]):
                    return store.get(FAILURE_KEY).decode()
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.1)
        except Exception:
            return None  # a store that is gone went with the process that held it, which then printed why

    def ensure_usable(self) -> None:
        if self.broken:
            raise GroupError("The GPU group stopped after an error in an earlier clip; restart to use it again.")

    # ---- end
    def on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` when the group closes: it drops something that holds the group's process groups (a
        pipeline whose transformer leads the group), which cannot run without them anyway."""
        if release not in self._on_close:
            self._on_close.append(release)

    def close(self) -> None:
        """Stop the other ranks (unless a failure left them inside a forward: then their launcher ends them), end the
        process groups and let go of everything that holds them."""
        if self.closing.is_set():
            return
        self.closing.set()
        if self.rank == 0 and not self.broken:
            with self.lock:
                self.send("stop")
        for p in self.processes:
            try:
                p.wait(timeout=STOP_WAIT_S if not self.broken else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
        if not self.broken:
            dist.destroy_process_group()
        for release in self._on_close:
            release()
        self._on_close.clear()
        self.control = None


_GROUP: Optional[Group] = None


def current() -> Optional[Group]:
    """The sequence-parallel group this process leads or follows, if any."""
    return _GROUP


def _backend(device: torch.device) -> str:
    # Control messages and CPU tensors go through gloo, CUDA tensors through NCCL; diffusers gathers its share sizes
    # on the CPU when the backend names one.
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"


def _init_process_group(backend: str, **kwargs) -> None:
    """`dist.init_process_group`, with `torch.distributed.nn.functional` imported first: that module gives ten
    collectives the default process group as a default argument, evaluated when it is first imported (diffusers'
    import of torch._dynamo pulls it in, so on the first pipeline load). Imported while a group runs, those defaults
    keep the group alive after `destroy_process_group` — its gloo threads and the TCP store's server thread with it,
    left to interpreter shutdown (see `stop_group`); imported before, they hold None."""
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def init_from_env() -> Group:
    """Join the group torchrun (or `start_group`) described in the environment: RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT. Each rank takes the GPU of its local rank."""
    from engine.models.parallel import check_accelerator

    global _GROUP
    check_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    _init_process_group(_backend(device))
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), device)
    return _GROUP


# ---------------------------------------------------------------------------------------------------- rank 0
class SequenceParallelBackend(Backend):
    """The transformer forward of rank 0 in a group: sends the inputs to the other ranks, then runs its share."""

    name = "sequence-parallel"

    def __init__(self, model: torch.nn.Module, group: Group, model_id: int):
        super().__init__(model)
        self.group = group
        self.model_id = model_id

    def __call__(self, **kwargs):
        from engine.models.transformer import InputError

        group = self.group
        with group.lock:
            group.ensure_usable()
            tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
            shapes = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()]
            values = {k: v for k, v in kwargs.items() if k not in tensors}
            try:
                group.send("forward", {"id": self.model_id, "tensors": shapes, "values": values})
                group.send_tensors(tensors)
                return self.model(**kwargs)
            except InputError:
                raise  # raised alike on every rank (same inputs); the group goes on
            except BaseException:
                group.broken = True
                if group.posted_failure(PEER_FAILURE_WAIT_S) is not None:
                    raise PeerFailed() from None
                raise


def lead(pipe, source, release: Optional[Callable[[], None]] = None) -> None:
    """Make ``pipe``'s transformer run on the whole group (rank 0; no-op outside a group): the other ranks load the
    same checkpoint package ``source`` (weights once per rank), all ranks enable sequence parallelism, and the
    pipeline's forwards go through `SequenceParallelBackend`. ``release`` drops the pipeline when the group closes."""
    from engine.models.parallel import check_degree, enable_sequence_parallel

    group = current()
    if group is None:
        return
    with group.lock:
        group.ensure_usable()
        check_degree(pipe.transformer, group.world)
        model_id = next(group._ids)
        group.send("load", {"id": model_id, "source": str(source), "dtype": str(pipe.dtype).removeprefix("torch.")})
        errors = group.gather_errors(None)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            rank, error = failed[0]
            raise GroupError(f"Rank {rank} could not load the transformer ({error}); every rank reads the weights "
                             f"from {source}, so every machine needs them at that path.")
        enable_sequence_parallel(pipe.transformer)
        if release is not None:
            group.on_close(release)
    pipe.backend = SequenceParallelBackend(pipe.transformer, group, model_id)


# ---------------------------------------------------------------------------------------------------- other ranks
def _receive_while_loading_code(group: Group):
    """Rank 0's first message, received on a helper thread while this thread imports the model code (diffusers:
    seconds). Rank 0's sends return only once every rank has the message, so a command that stops before any forward
    (an input error) would otherwise wait for those imports before it could end."""
    got: dict = {}

    def listen():
        try:
            got["message"] = group.receive()
        except BaseException as e:  # raised here, on the thread that follows
            got["error"] = e

    listener = threading.Thread(target=listen, daemon=True, name="gpu-group-first-message")
    listener.start()
    import engine.models.loading  # noqa: F401  (the imports `follow` needs for its first model)

    listener.join()
    if "error" in got:
        raise got["error"]
    return got["message"]


def follow(group: Group) -> None:
    """Serve rank 0's transformer forwards until it says stop."""
    message = _receive_while_loading_code(group)
    from engine.models.loading import load_transformer
    from engine.models.parallel import enable_sequence_parallel
    from engine.models.transformer import InputError

    models: dict = {}
    while True:
        kind, body = message or group.receive()
        message = None
        if kind == "stop":
            return
        if kind == "load":
            models.clear()  # rank 0 keeps one resident transformer (a variant switch replaces it): so do we
            error = None
            try:
                models[body["id"]] = load_transformer(body["source"], device=group.device,
                                                      dtype=getattr(torch, body["dtype"]))
            except Exception as e:  # reported by rank 0 in one sentence
                error = _sentence(e)
            if any(group.gather_errors(error)):
                models.pop(body["id"], None)
                continue
            enable_sequence_parallel(models[body["id"]])
        elif kind == "forward":
            kwargs = {**body["values"], **group.receive_tensors(body["tensors"])}
            try:
                with torch.no_grad():
                    models[body["id"]](**kwargs)
            except InputError:
                pass  # rank 0 raised the same and reports it


def _follower_main(group: Group) -> int:
    _quiet()
    try:
        follow(group)
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as e:  # every failure ends in one sentence
        sentence = f"rank {group.rank} failed ({_sentence(e)}); all ranks stop."
        group.post_failure(sentence)
        print(f"error: {sentence}", file=sys.stderr, flush=True)
        os._exit(1)  # peers may sit inside a collective: no orderly shutdown
    stop_group()
    return 0


def run_launched(command: Callable[[], int]) -> int:
    """A torchrun rank: rank 0 runs ``command`` (the CLI) and then stops the others; the others follow it."""
    from engine.models.parallel import ParallelError

    try:
        group = init_from_env()
    except ParallelError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if group.rank != 0:
        return _follower_main(group)
    code = 1
    try:
        code = command()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except PeerFailed:
        code = 1
    finally:
        stop_group()
    return code


def main() -> int:
    """A worker process started by `start_group`: joins the group and follows rank 0 (the app)."""
    from engine.models.parallel import ParallelError

    try:
        group = init_from_env()
    except ParallelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _follower_main(group)


# ---------------------------------------------------------------------------------------------------- the app's group
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch(processes: Sequence[subprocess.Popen], devices: Sequence[str], closing: threading.Event) -> None:
    """Ends the app when a worker process ends while the group is open (its forwards cannot go on without it)."""
    while not closing.is_set():
        for rank, p in enumerate(processes, start=1):
            code = p.poll()
            if code is not None and not closing.is_set():
                if code not in (1, 2):  # 1 and 2: the worker printed its own sentence
                    print(f"error: the worker process of rank {rank} ({devices[rank]}) ended with exit code {code}; "
                          "the server stops.", file=sys.stderr, flush=True)
                os._exit(1)
        time.sleep(0.5)


def _visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's GPU ``index`` (a worker must see the same physical GPU)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def start_group(devices: Sequence[str]) -> Group:
    """Make this process rank 0 of a sequence-parallel group over ``devices`` ("cuda:0", "cuda:1", ...): start one
    worker process for each further device, join them, and stop them when this process exits."""
    from engine.models.parallel import check_accelerator

    global _GROUP
    check_accelerator()
    devices = [str(d) for d in devices]
    port = _free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(len(devices)),
            "LOCAL_RANK": "0"}
    processes = []
    for rank, dev in enumerate(devices[1:], start=1):
        env = {**base, "RANK": str(rank)}
        if torch.device(dev).type == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = _visible_gpu(torch.device(dev).index or 0)  # its one GPU, seen as cuda:0
        processes.append(subprocess.Popen([sys.executable, "-m", "engine.distributed"], env=env))
    closing = threading.Event()
    threading.Thread(target=_watch, args=(processes, devices, closing), daemon=True, name="gpu-group-watch").start()
    device = torch.device(devices[0])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _init_process_group(_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=len(devices))
    _GROUP = Group(0, len(devices), device, processes, closing)
    atexit.register(stop_group)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # a plain SIGTERM would skip atexit and leave the workers waiting for a rank 0 that is gone
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return _GROUP


def stop_group() -> None:
    """End the group this process leads or follows (no-op without one): rank 0 stops the other ranks first.

    Then everything that held the group's process groups is collected (models' device meshes and hooks keep them
    alive after ``destroy_process_group``), so gloo's threads stop now, while the interpreter is whole. Left to
    interpreter shutdown, a gloo thread still releasing its last collective's tensors takes the GIL of an interpreter
    being torn down and aborts the process (SIGABRT at exit, seen on a loaded machine)."""
    global _GROUP
    if _GROUP is not None:
        _GROUP.close()
        _GROUP = None
        gc.collect()


if __name__ == "__main__":
    atexit.register(gc.freeze)  # a quicker exit, as `python -m engine` (engine/__main__.py)
    sys.exit(main())

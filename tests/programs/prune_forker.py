"""Imports once, then forks one `wandamerge prune` child per moment; each stalls there until killed.

    python prune_forker.py JOBS_JSON    (prints "PID MOMENT" per child, then reaps them all)
"""
import json, os, pathlib, sys, time
import transformers.modeling_utils as mu
import wandamerge.jobs.prune  # noqa: F401  (imported once, before the children fork)
from transformers import LlamaForCausalLM  # noqa: F401
from wandamerge.cli import main

def child(moment, root, args):
    marker = pathlib.Path(root) / "marker"
    err = os.open(pathlib.Path(root) / "stderr", os.O_WRONLY | os.O_CREAT)
    os.dup2(err, 1)
    os.dup2(err, 2)

    def pause():
        marker.write_text("ready")
        time.sleep(600)

    if moment == "mid-shard":  # part of a shard written, then stall
        def partial(state, filename, metadata=None):
            pathlib.Path(filename).write_bytes(b"\0" * 100)
            pause()
        mu.safe_save_file = partial
    elif moment in ("before-rename", "after-rename"):
        rename = pathlib.Path.rename
        def stalled(self, target):
            if moment == "before-rename" and pathlib.Path(target).name == "out":
                pause()
            result = rename(self, target)
            if moment == "after-rename" and pathlib.Path(target).name == "out":
                pause()
            return result
        pathlib.Path.rename = stalled
    try:
        main(["-q", *args])
    except SystemExit as exc:
        os._exit(exc.code or 0)
    os._exit(0)

children = []
for moment, root, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        child(moment, root, args)
    children.append(pid)
    print(pid, moment, flush=True)
for pid in children:
    os.waitpid(pid, 0)

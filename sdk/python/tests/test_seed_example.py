"""The seed's example, adapted only in how the service is named (it is also in the README)."""

import json
import subprocess
import sys

from conftest import BROKER_URI, HERE, delete_queues, unique_queue


def test_the_seeds_example():
    import warren

    queue = unique_queue("seed")
    try:
        rpc = warren.service(queue)  # the adaptation: a service is named by its queue

        # --- the seed's example -------------------------------------------------------------------------------
        @rpc.expose
        def add(a, b):
            return a + b
        rpc.start_server()

        result = rpc.call('add', 1, 2)   # 3
        # ------------------------------------------------------------------------------------------------------

        assert result == 3
        assert rpc.add(1, 2) == 3
    finally:
        for thread in list(warren.responder._running_threads):
            thread.stop(30)
        warren.default_client().close()
        warren.set_default_client(None)
        delete_queues(queue, queue + ".dead")


def test_the_readmes_example_runs_as_a_script():
    """The README's first example, extracted and run as a program of its own (server and caller in one), then
    stopped by SIGTERM, which drains the server and exits 0."""
    readme = (HERE.parent / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    queue = unique_queue("readme")
    stop = "\nimport os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n"
    script = example.replace('"calculator"', json.dumps(queue)) + stop
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={"WARREN_BROKER_URI": BROKER_URI, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "3"
    finally:
        delete_queues(queue, queue + ".dead")

"""Run a command with a time limit that also ends everything it started.

``subprocess.run(timeout=...)`` kills only the direct child: the ranks that
an ``mpiexec`` or ``msrun`` launched could live on, stuck in a collective.
Here the command gets a session (process group) of its own, and on timeout
the whole group is killed.
"""
import os
import signal
import subprocess


def run_bounded(cmd, timeout, env=None):
    """CompletedProcess (text stdout/stderr); raises subprocess.TimeoutExpired after killing the group."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

"""Ends a session of processes and removes a folder once a given process is gone, however it ended.

`python -m distill.reaper PID SID FOLDER`: started in its own session by a command that starts a
process tree it cannot tie to its own life (a local Ray head whose agents outlive their parent), so
that not even `kill -9` of the command leaves a process or a temporary folder behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import time


def end_session(sid: int) -> None:
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.pid != os.getpid():
                proc.kill()
        except (OSError, psutil.Error):
            continue  # already gone, or not ours to see


def main(pid: int, sid: int, folder: str) -> None:
    import psutil

    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.3)
    end_session(sid)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

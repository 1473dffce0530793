"""Training jobs in the background: `torchrun ... -m train.finetune` as a subprocess whose run
folder another process (the app) follows, cancels and resumes.

A job is its run folder under `runs_dir`: job.json (what was launched, when, by whom, the
process id, or the flags it waits to launch with while it is in line),
plus what train.finetune writes (config.json, metrics.jsonl, train.log, status.json, adapters,
state.pt) and the launcher's console output (console.log). Everything is on disk, so a page
reload or an app restart finds every job again, running, waiting or done. At most `max_running`
jobs run at once (on a shared CPU one is plenty); `pump` launches the next in line when one ends.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.files import write_json
from train.data import load_records

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class JobView:
    """What a page shows of a job."""
    id: str
    state: str            # queued | running | finished | stopped | cancelled | failed | crashed
    step: int
    total_steps: int
    eta: float | None
    error: str | None
    adapter: str | None   # the registry name of its adapter, once registered
    data: str
    metrics: list[dict] = field(default_factory=list, repr=False)  # metrics.jsonl, read for this view
    by: str = "owner"            # whose job: "owner" or a visitor's id
    position: int | None = None  # place in line while queued (1: launches next)


class JobRunner:
    def __init__(self, runs_dir: str | os.PathLike, model: str = "smollm2", python: str = sys.executable,
                 max_running: int | None = None):
        self.runs_dir = Path(runs_dir).resolve()  # the jobs run from the project root
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.model = str(Path(model).resolve()) if Path(model).exists() else model
        self.python = python
        self.max_running = max_running  # jobs running at once; the rest wait in line (None: no limit)
        self._procs: dict[str, subprocess.Popen] = {}  # jobs this process launched
        self._lock = threading.Lock()  # one launcher at a time, so the limit holds

    # -- launching ------------------------------------------------------------------------
    def start(self, data: str, name: str = "", nproc: int = 1, options: dict | None = None, by: str = "owner") -> str:
        """Validate `data` (a file, a shipped dataset name or task:NAME), then queue the job; it
        launches at once if fewer than `max_running` jobs run. Returns the job id. `options` are
        train.finetune flags without dashes, e.g. {"prompt_len": 10, "bias_scale": True}; `by`:
        whose job it is (a visitor's id, or "owner")."""
        load_records(data)  # a bad file is refused here, before any process or folder exists
        if not 1 <= int(nproc) <= max(1, os.cpu_count() or 1) * 4:
            raise UserError(f"processes must be between 1 and {max(1, os.cpu_count() or 1) * 4}, got {nproc}")
        job_id = self._new_id(name or Path(data.replace("task:", "")).stem)
        out = self.runs_dir / job_id
        out.mkdir(parents=True)
        if Path(data).is_file():  # a copy in the run folder: uploads are temporary, and resume rereads it
            copy = out / f"data{Path(data).suffix.lower()}"
            shutil.copyfile(data, copy)
            data = str(copy.resolve())
        flags = ["--model", self.model, "--data", str(data), "--out", str(out)]
        for key, value in (options or {}).items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                flags.append(flag)
            elif value not in (False, None, ""):
                flags += [flag, str(value)]
        write_json(out / "job.json", {"id": job_id, "data": str(data), "nproc": int(nproc), "options": options or {},
                                      "by": by, "created": _now(), "pending": flags, "queued": time.time()})
        self.pump()
        return job_id

    def resume(self, job_id: str) -> str:
        out = self._dir(job_id)
        view = self.view(job_id)
        if view.state in ("running", "queued"):
            raise UserError(f"job {job_id} is {view.state}; cancel it before resuming")
        if view.state == "finished":
            raise UserError(f"job {job_id} has finished; there is nothing to resume")
        if not (out / "state.pt").is_file():
            raise UserError(f"job {job_id} saved no resumable state (it stopped before its first save)")
        write_json(out / "job.json", {**self._info(job_id), "pending": ["--resume", str(out)], "queued": time.time()})
        self.pump()
        return job_id

    def pump(self) -> list[str]:
        """Launch waiting jobs, oldest first, while fewer than `max_running` run; returns those launched."""
        launched = []
        with self._lock:
            jobs = self.jobs()
            running = sum(self._state(j)[0] == "running" for j in jobs)
            for job_id in self.waiting(jobs):
                if self.max_running is not None and running >= self.max_running:
                    break
                self._launch(job_id)
                launched.append(job_id)
                running += 1
        return launched

    def waiting(self, jobs: list[str] | None = None) -> list[str]:
        """The jobs in line, first to launch first."""
        infos = {j: self._info(j) for j in (self.jobs() if jobs is None else jobs)}
        return sorted((j for j, i in infos.items() if i.get("pending")), key=lambda j: infos[j]["queued"])

    def _launch(self, job_id: str):
        out, info = self.runs_dir / job_id, self._info(job_id)
        nproc = info.get("nproc", 1)
        # torchrun itself (`python -m torch.distributed.run` is the `torchrun` script); --standalone
        # gives each job its own rendezvous on a free port, so jobs never collide
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "train.finetune", *info.pop("pending")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # leave a core to the process that launched the job (the app keeps answering chats)
        env["OMP_NUM_THREADS"] = str(max(1, ((os.cpu_count() or 1) - 1) // nproc))
        (out / "status.json").unlink(missing_ok=True)  # the new process writes its own
        with open(out / "console.log", "ab") as console:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[job_id] = proc
        write_json(out / "job.json", {**info, "pid": proc.pid, "command": cmd, "launched": _now()})

    # -- following ------------------------------------------------------------------------
    def jobs(self, by: str | None = None) -> list[str]:
        """Every job on disk (or those of `by`), newest first."""
        found = [p.parent.name for p in self.runs_dir.glob("*/job.json")]
        infos = {j: self._info(j) for j in found}
        return sorted((j for j in found if by is None or infos[j].get("by", "owner") == by),
                      key=lambda j: infos[j].get("created", ""), reverse=True)

    def owner_of(self, job_id: str) -> str:
        self._dir(job_id)
        return self._info(job_id).get("by", "owner")

    def _state(self, job_id: str, info: dict | None = None) -> tuple[str, str | None]:
        """(state, error): queued | running | finished | stopped | cancelled | failed | crashed."""
        out, info = self.runs_dir / job_id, info or self._info(job_id)
        if info.get("pending"):
            return "queued", None
        status = _read_json(out / "status.json") or {}
        state, error = status.get("state", "running"), status.get("error")
        if state == "running" and not self._alive(job_id, info.get("pid")):  # it died without saying why
            state, error = "crashed", error or _last_error(out / "console.log")
        return state, error

    def view(self, job_id: str) -> JobView:
        out, info = self._dir(job_id), self._info(job_id)
        state, error = self._state(job_id, info)
        status = _read_json(out / "status.json") or {}
        metrics = self.metrics(job_id)
        last = metrics[-1] if metrics else {}
        position = self.waiting().index(job_id) + 1 if state == "queued" else None
        return JobView(job_id, state, last.get("step", status.get("step", 0)), status.get("total_steps", 0),
                       last.get("eta") if state == "running" else None, error, info.get("adapter"), info.get("data", ""),
                       metrics, info.get("by", "owner"), position)

    def metrics(self, job_id: str) -> list[dict]:
        path = self._dir(job_id) / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
        return rows

    def log_tail(self, job_id: str, lines: int = 30) -> str:
        out = self._dir(job_id)
        text = ""
        for name in ("train.log", "console.log"):
            if (out / name).is_file():
                text = (out / name).read_text(errors="replace")
                if name == "train.log" and text.strip():
                    break
        return "\n".join(text.splitlines()[-lines:])

    def cancel(self, job_id: str, wait: float = 0.0) -> bool:
        """A waiting job leaves the line; a running one gets SIGTERM to its process group, and
        train.finetune saves a resumable state and exits 0."""
        view = self.view(job_id)
        if view.state == "queued":
            info = self._info(job_id)
            del info["pending"]
            if "pid" not in info:  # it never ran: nothing to resume
                write_json(self._dir(job_id) / "status.json", {"state": "cancelled", "step": 0})
            write_json(self._dir(job_id) / "job.json", info)
            return True
        if view.state != "running":
            raise UserError(f"job {job_id} is not running ({view.state})")
        pid = self._info(job_id).get("pid")
        os.killpg(pid, signal.SIGTERM)  # torchrun and its workers (their own session)
        deadline = time.time() + wait
        while wait and time.time() < deadline and self._alive(job_id, pid):
            time.sleep(0.1)
        return not self._alive(job_id, pid)

    def register_finished(self, registry) -> list[str]:
        """Copy the adapter of every finished job not yet registered into `registry`; returns the
        names. A visitor's adapter is kept private to them (the owner may publish it)."""
        added = []
        for job_id in self.jobs():
            info = self._info(job_id)
            adapter = self._dir(job_id) / "adapter.safetensors"
            if info.get("adapter") or not adapter.is_file() or self._state(job_id, info)[0] != "finished":
                continue
            name, n = job_id, 1
            while registry.path(name).exists():
                n += 1
                name = f"{job_id}-{n}"
            by = info.get("by", "owner")
            added.append(registry.add(adapter, name, keeper=None if by == "owner" else by))
            write_json(self._dir(job_id) / "job.json", {**info, "adapter": added[-1]})
        return added

    def delete(self, job_id: str):
        self._dir(job_id)  # an unknown or malformed id is refused first
        state = self._state(job_id)[0]
        if state in ("running", "queued"):
            raise UserError(f"job {job_id} is {state}; cancel it first")
        shutil.rmtree(self._dir(job_id))

    # -- helpers --------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", job_id or "") or not (self.runs_dir / job_id / "job.json").is_file():
            raise UserError(f"no job named {job_id!r}")
        return self.runs_dir / job_id

    def _info(self, job_id: str) -> dict:
        return _read_json(self.runs_dir / job_id / "job.json") or {}

    def _new_id(self, name: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        job_id, n = f"{stem}-{stamp}", 1
        while (self.runs_dir / job_id).exists():
            n += 1
            job_id = f"{stem}-{stamp}-{n}"
        return job_id

    def _alive(self, job_id: str, pid: int | None) -> bool:
        proc = self._procs.get(job_id)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        if not pid:
            return False
        try:  # launched by an earlier app process: not our child, so no zombie to reap
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _last_error(console: Path) -> str:
    lines = [l for l in console.read_text(errors="replace").splitlines() if l.strip()] if console.is_file() else []
    errors = [l for l in lines if re.match(r"^(error|\w+Error|\w+Exception)\b", l.strip())]
    return (errors or lines or ["the process ended without output"])[-1].strip()[:300]


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")

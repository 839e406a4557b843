"""``mount.fuse.azregfs``: the helper mount(8) runs for file systems of type ``fuse.azregfs``.

An ``/etc/fstab`` line such as::

    registry-data /var/lib/docker-registry fuse.azregfs _netdev,config=/etc/azregfs/reg.yml 0 0

makes ``mount /var/lib/docker-registry`` (and systemd's generated .mount unit) run::

    mount.fuse.azregfs registry-data /var/lib/docker-registry -o rw,_netdev,config=...

The first field may be ``none`` when the config file names the container.

The helper hands that to ``azregfs mount``, which forks the daemon and returns once the
mount is live (or failed, with its reason), as mount(8) expects of a helper.
"""

from __future__ import annotations

import sys

USAGE = "usage: mount.fuse.azregfs CONTAINER MOUNTPOINT [-o OPTIONS] [-fnsv] [-t TYPE]"


def translate(argv: list[str]) -> list[str] | None:
    """mount(8)'s helper arguments -> ``azregfs`` arguments; None for a fake mount (-f)."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.append(next(args, ""))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg == "-t":
            next(args, None)  # always fuse.azregfs
        elif arg.startswith("-") and len(arg) > 1:
            # -n (no mtab), -s (sloppy), -v (verbose), -r/-w: nothing for us to do.
            fake = fake or "f" in arg[1:]
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit(USAGE)
    container, mountpoint = positional
    if fake:
        return None
    command = ["mount"]
    for text in options:
        if text:
            command += ["-o", text]
    # "none" in the first fstab field: the config file names the container.
    if container not in ("none", ""):
        command.append(container)
    command.append(mountpoint)
    return command


def main(argv: list[str] | None = None) -> int:
    command = translate(sys.argv[1:] if argv is None else argv)
    if command is None:
        return 0
    from .cli import main as cli_main

    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())

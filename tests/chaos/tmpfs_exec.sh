#!/bin/bash
# tmpfs_exec.sh DIR SIZE CMD ARGS...: mount a tmpfs of SIZE on DIR, then exec CMD. Run under
# `unshare -m --propagation private` so that the mount exists only in the process's own mount
# namespace and vanishes with it (nothing to unmount, even after SIGKILL).
dir=$1 size=$2
shift 2
mkdir -p "$dir" && mount -t tmpfs -o "size=$size" kvr-chaos "$dir" || exit 1
exec "$@"

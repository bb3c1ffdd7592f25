#!/bin/bash
# Slurm prolog (runs as root on each node of a job before its first step):
# start this node's mpumap server for the job's user if it is not running,
# so that every rank on the node shares one page buffer over the same
# bucket.  Pair it with slurm-epilog.sh, and in the job:
#
#   export MPUMAP_SOCKET=/tmp/mpumap-$SLURM_JOB_ID.sock
#   srun python train.py        # mpumap.connect() finds the socket
#
# Credentials for the object store come from /etc/mpumap/env (root-only),
# never from the job.
set -euo pipefail
SOCKET=/tmp/mpumap-${SLURM_JOB_ID}.sock
PIDFILE=/run/mpumap-${SLURM_JOB_ID}.pid
[ -S "$SOCKET" ] && exit 0
set -a; [ -r /etc/mpumap/env ] && . /etc/mpumap/env; set +a
# The job's user may connect; the buffer adapts to the memory the node can
# spare (leave --buffer-size out), or give it a size with --buffer-size.
setsid /usr/local/bin/mpumap-server --socket "$SOCKET" --pidfile "$PIDFILE" \
    --socket-mode 0600 --allow-uid "$SLURM_JOB_USER" \
    --allow-remote "${MPUMAP_ALLOW_REMOTE:-s3://training-data/*}" \
    --log-level warning >>/var/log/mpumap-${SLURM_JOB_ID}.log 2>&1 < /dev/null &
for _ in $(seq 100); do [ -S "$SOCKET" ] && break; sleep 0.1; done
# The socket belongs to root: let the job's user in.
chown "$SLURM_JOB_USER" "$SOCKET"

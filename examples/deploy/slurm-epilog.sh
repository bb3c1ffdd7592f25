#!/bin/bash
# Slurm epilog: stop the job's mpumap server on this node (see slurm-prolog.sh).
PIDFILE=/run/mpumap-${SLURM_JOB_ID}.pid
[ -r "$PIDFILE" ] && kill -TERM "$(cat "$PIDFILE")" 2>/dev/null
exit 0

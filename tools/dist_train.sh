#!/usr/bin/env bash
# Usage: bash tools/dist_train.sh CONFIG GPUS [train.py options]
# PYTHON: the interpreter to run (default: python on PATH, e.g. PYTHON=.venv/bin/python)
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 PORT=29500 bash tools/dist_train.sh ...
# Restarts: MAX_RESTARTS=3 lets torchrun restart all processes (up to 3 times) when one
#   fails; the restarted processes resume from the work dir's last complete checkpoint.
# Elastic rendezvous (nodes that may fail and come back): RDZV_ENDPOINT=host0:29400
#   [RDZV_ID=job42] [RDZV_BACKEND=c10d] NNODES=2 (or MIN:MAX, e.g. 1:2), the same on every
#   node, in place of NODE_RANK/MASTER_ADDR/PORT.
# Preemption: the exit status is 75 when the run stopped on a preemption signal after
#   saving a checkpoint (ddetr.PreemptionHook); torchrun passes SIGTERM, SIGINT, SIGHUP,
#   SIGQUIT, SIGUSR1 and SIGUSR2 on to the processes and waits SHUTDOWN_TIMEOUT seconds
#   (default 60) for them to save and exit.
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
MAX_RESTARTS=${MAX_RESTARTS:-0}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-60}

if [ -n "$RDZV_ENDPOINT" ]; then
    RENDEZVOUS="--rdzv-backend=${RDZV_BACKEND:-c10d} --rdzv-endpoint=$RDZV_ENDPOINT"
    RENDEZVOUS="$RENDEZVOUS --rdzv-id=${RDZV_ID:-ddetr}"
else
    RENDEZVOUS="--node_rank=$NODE_RANK --master_addr=$MASTER_ADDR --master_port=$PORT"
fi
# Older torchruns lack these options: they keep their own defaults then.
HELP=$(${PYTHON:-python} -m torch.distributed.run --help 2>/dev/null)
SIGNAL_OPTIONS=""
if [[ "$HELP" == *--signals[-_]to[-_]handle* ]]; then
    SIGNAL_OPTIONS="--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
fi
if [[ "$HELP" == *--shutdown[-_]timeout* ]]; then
    SIGNAL_OPTIONS="$SIGNAL_OPTIONS --shutdown_timeout=$SHUTDOWN_TIMEOUT"
fi
# Rank 0 creates this file when the run is preempted (see PreemptionHook).
export DDETR_PREEMPTED_MARK=${DDETR_PREEMPTED_MARK:-"${TMPDIR:-/tmp}/ddetr-preempted-$$"}
rm -f "$DDETR_PREEMPTED_MARK"
# A signal caught here waits for torchrun to end (bash runs a trap only after the command
# it waits for), so that this script still reports how the run ended.
trap : TERM HUP USR1 USR2

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
${PYTHON:-python} -m torch.distributed.run \
    --nnodes=$NNODES \
    $RENDEZVOUS \
    --nproc_per_node=$GPUS \
    --max-restarts=$MAX_RESTARTS \
    $SIGNAL_OPTIONS \
    $(dirname "$0")/train.py \
    $CONFIG \
    --launcher pytorch ${@:3}
STATUS=$?
if [ $STATUS -ne 0 ] && [ -e "$DDETR_PREEMPTED_MARK" ]; then
    echo "dist_train.sh: preempted; saved $(cat "$DDETR_PREEMPTED_MARK"); the same command" \
        "with --resume continues from it" >&2
    rm -f "$DDETR_PREEMPTED_MARK"
    exit 75
fi
rm -f "$DDETR_PREEMPTED_MARK"
exit $STATUS

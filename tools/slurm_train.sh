#!/usr/bin/env bash
# Usage: [GPUS=16] bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py options]
# PYTHON: the interpreter to run (default: python on PATH, e.g. PYTHON=.venv/bin/python)
# Preemption (ddetr.PreemptionHook in the config): when Slurm signals the job, every task
#   saves a checkpoint after the same iteration and the script exits with status 75.
#   Inside a batch job (sbatch, SLURM_JOB_ID set), REQUEUE=1 then requeues it
#   (scontrol requeue); the requeued job resumes by itself (SLURM_RESTART_COUNT).
set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PY_ARGS=${@:5}

# On the shared file system: rank 0, which creates it, may run on another node.
export DDETR_PREEMPTED_MARK="${WORK_DIR}/.preempted"
rm -f "$DDETR_PREEMPTED_MARK"
# A signal caught here waits for srun to end (bash runs a trap only after the command it
# waits for), so that this script still reports how the run ended.
trap : TERM HUP USR1 USR2

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
srun -p ${PARTITION} \
    --job-name=${JOB_NAME} \
    --gres=gpu:${GPUS_PER_NODE} \
    --ntasks=${GPUS} \
    --ntasks-per-node=${GPUS_PER_NODE} \
    --cpus-per-task=${CPUS_PER_TASK} \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    ${PYTHON:-python} -u $(dirname "$0")/train.py ${CONFIG} --work-dir=${WORK_DIR} --launcher="slurm" ${PY_ARGS}
STATUS=$?
if [ $STATUS -ne 0 ] && [ -e "$DDETR_PREEMPTED_MARK" ]; then
    rm -f "$DDETR_PREEMPTED_MARK"
    if [ "${REQUEUE:-0}" = 1 ] && [ -n "$SLURM_JOB_ID" ]; then
        scontrol requeue "$SLURM_JOB_ID" || exit $?
    elif [ "${REQUEUE:-0}" = 1 ]; then
        echo "slurm_train.sh: REQUEUE=1 needs a batch job (no SLURM_JOB_ID): submit the" \
            "same command again with --resume" >&2
    fi
    exit 75
fi
rm -f "$DDETR_PREEMPTED_MARK"
exit $STATUS

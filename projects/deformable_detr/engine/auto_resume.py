"""Automatic resume of a restarted run.

torchrun restarts the processes of a job when one fails (``--max-restarts``, set by
``MAX_RESTARTS`` in ``tools/dist_train.sh``); Slurm reruns a requeued job's script. Both
run the same command line again, and say so in the environment:
``TORCHELASTIC_RESTART_COUNT`` and ``SLURM_RESTART_COUNT`` count the restarts. A
restarted run then resumes by itself, as ``--resume`` without a path does: from the
checkpoint named in the work dir's ``last_checkpoint`` (written only once the checkpoint
is complete); if there is none yet, it starts as the first launch did.
"""
import os
from typing import Optional, Tuple

from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import find_latest_checkpoint

RESTART_COUNTS = ('TORCHELASTIC_RESTART_COUNT', 'SLURM_RESTART_COUNT')


def restart() -> Optional[Tuple[str, int]]:
    """The variable and count of a restart of this run by torchrun or Slurm, or None."""
    for name in RESTART_COUNTS:
        value = os.environ.get(name, '').strip()
        if value.isdigit() and int(value) > 0:
            return name, int(value)
    return None


def resume_if_restarted(cfg: Config) -> bool:
    """Sets ``cfg`` to resume from the work dir's latest checkpoint if this is a restart.

    A run told to resume already (``cfg.resume``) is left as it is; so is a restart
    that finds no checkpoint yet (it starts as the first launch did, from ``load_from``
    if the config names one). Returns whether it set the resume.
    """
    restarted = restart()
    if restarted is None or cfg.get('resume'):
        return False
    latest = find_latest_checkpoint(cfg.work_dir)
    if latest is None:
        print_log(f'{restarted[0]}={restarted[1]}: a restarted run, but {cfg.work_dir} '
                  'holds no checkpoint yet: starting from the beginning', logger='current')
        return False
    cfg.resume, cfg.load_from = True, latest
    print_log(f'{restarted[0]}={restarted[1]}: a restarted run; resuming from {latest}',
              logger='current')
    return True

"""`lorafleet sweep`: Ray Tune runs a job's trials side by side, each the TorchTrainer `lorafleet train` builds.

    lorafleet sweep configs/sweep-tiny.yaml
    lorafleet sweep --resume tiny-sweep-20261202-101500

Every trial is a Tune function trial that builds its job (the base config with the trial's values) and runs
it as the normal run `<sweep-id>-t<N>` (launcher.run_trial). Ray Train's TuneReportCallback hands each report
of the workers (every evaluation, every checkpoint) to Tune, whose ASHA scheduler stops the trials that fall
behind. Tune keeps its experiment state in the sweep folder, so `--resume` restores it: finished trials stay,
unfinished ones resume from their run's last checkpoint. A trial whose run already succeeded is not trained
again (a sweep killed after the trial ended but before Tune saved its state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError
from lorafleet.runs import RunFolder, SweepTrial
from lorafleet.sweep_trials import check_sweep, trial_job
from lorafleet.sweeps import CONFIG_FILE, PLOT_FILE, BestTrial, SweepFolder, new_sweep_id
from lorafleet.training.console import RunConsole
from lorafleet.training.launcher import connect_ray, preflight, provision_builtins, run_trial
from lorafleet.training.sweep_plot import plot_sweep
from lorafleet.training.sweep_report import TrialRow, collect_trials, last_metrics, write_reports
from lorafleet.training.sweep_table import SweepTable

# A trial only drives its Ray Train run, whose workers hold the resources. Tune refuses an empty request, so
# the trial asks for one byte of memory: every node has some (a head started with num-cpus 0 too).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1}


@dataclass(frozen=True)
class SweepOutcome:
    folder: SweepFolder
    rows: list[TrialRow]
    best: BestTrial | None


def run_sweep(
    job: JobConfig,
    *,
    sweep_id: str | None = None,
    address: str | None = None,
    verbose: bool = False,
) -> SweepOutcome:
    """Run the sweep of `job` (continue it, when sweep `sweep_id` exists with the same config); every trial
    ends finished, stopped early or failed."""
    if job.sweep is None:
        raise LorafleetError(f"the config of job {job.name!r} has no sweep: section (see docs/sweeps.md)")
    check_sweep(job)
    folder = SweepFolder.of(job.storage.uri, sweep_id or new_sweep_id(job.name))
    resume = folder.read_text(CONFIG_FILE) is not None
    if resume:
        if folder.read_config() != job:
            raise LorafleetError(
                f"sweep {folder.sweep_id} exists with a different config: continue it with --resume "
                f"{folder.sweep_id} (its saved config), or give a new --sweep-id"
            )
    folder.write_config(job)
    first = trial_job(job, {path: domain.probes()[0] for path, domain in job.sweep.space.items()})
    print(f"sweep {folder.sweep_id}{' (resuming)' if resume else ''}\nfolder {folder}", flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables off (verbose=0): SweepTable is ours
    console = RunConsole(folder, verbose=verbose, name=folder.sweep_id)
    console.start()
    try:
        preflight(first, embedded=address is None)
        if address is None:
            provision_builtins(first)
        connect_ray(first, address, quiet=not verbose, cpus_needed=_cpus_needed(first, job))
        console.follow_workers()
        print(f"log {console.log_path}", flush=True)
        grid = _tuner(job, folder, resume).fit()
    finally:
        console.stop()
    rows = collect_trials(grid, job, folder)
    best = write_reports(rows, job, folder)
    folder.write_bytes(PLOT_FILE, plot_sweep(rows, job))
    return SweepOutcome(folder=folder, rows=rows, best=best)


def _cpus_needed(trial: JobConfig, job: JobConfig) -> float:
    per_trial = trial.distributed.num_workers * trial.distributed.resources_per_worker.get("CPU", 1)
    return per_trial * (job.sweep.max_concurrent_trials or 1)


def _tuner(job: JobConfig, folder: SweepFolder, resume: bool):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, job_yaml=job.to_yaml(), sweep_uri=folder.uri),
        TRIAL_DRIVER_RESOURCES,
    )
    if resume and tune.Tuner.can_restore(folder.tune_uri):  # without Tune's state (killed at once): start over
        return tune.Tuner.restore(folder.tune_uri, trainable=trainable, resume_unfinished=True, resume_errored=False)
    sweep = job.sweep
    return tune.Tuner(
        trainable,
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
            scheduler=_scheduler(job),
            search_alg=_search(job),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=folder.uri,
            verbose=0,  # the live table is SweepTable's
            callbacks=[SweepTable(job.sweep, folder.sweep_id, max_steps=job.training.max_steps)],
        ),
    )


def _scheduler(job: JobConfig):
    from ray.tune.schedulers import ASHAScheduler

    asha = job.sweep.scheduler
    if asha is None:
        return None
    return ASHAScheduler(
        time_attr="step",
        # one past the last step: ASHA stops a trial that reaches max_t, which would race the run's own end
        max_t=asha.max_t or (job.training.max_steps or 10**6) + 1,
        grace_period=asha.grace_period or job.training.eval_steps,
        reduction_factor=asha.reduction_factor,
    )


def _search(job: JobConfig):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=job.sweep.seed) if job.sweep.seed is not None else None


def trial_name(trial) -> str:
    """`t<N>`: Tune numbers the trials it generates (`<prefix>_<NNNNN>`); the run is `<sweep-id>-t<N>`."""
    return f"t{trial_index(trial.trial_id)}"


def trial_index(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


def sweep_trial(values: dict[str, Any], *, job_yaml: str, sweep_uri: str) -> None:
    """One Tune trial: the base job with `values` set, run as `<sweep-id>-t<N>` (N: the trial's number)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    job = JobConfig.model_validate(yaml.safe_load(job_yaml))
    folder = SweepFolder(sweep_uri)
    trial = trial_index(tune.get_context().get_trial_id())
    run_id = folder.trial_run_id(trial)
    record = RunFolder.of(job.storage.uri, run_id).read_record()
    if record is not None and record.status == "succeeded":  # it ended before the sweep's state was saved
        tune.report(last_metrics(RunFolder.of(job.storage.uri, run_id)))
        return
    lineage = SweepTrial(sweep_id=folder.sweep_id, trial=trial, parameters=dict(values), metric=job.sweep.metric)
    run_trial(trial_job(job, values), run_id, callbacks=[TuneReportCallback()], sweep=lineage)

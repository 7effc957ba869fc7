"""Test-only start-up code for tests/plugin/test_scale_out.py: first on the PYTHONPATH of
``llamafactory-cli train`` as a user runs it (multi-node torchrun, ``USE_RAY=1``). Python imports
it in every interpreter started with that environment: the launcher, each torchrun child, and,
under Ray, the driver and every Ray worker (LLaMA-Factory hands the driver's environment to the
workers through their runtime_env).

It does nothing unless ``MACDROP_TEST_TRACE_DIR`` is set, and then only once
``llamafactory.train.tuner`` loads (the processes Ray starts for itself never import it):

* the spy: in a process that trains, :class:`dist_check.Recorder` (the oracle of the torchrun
  tests, which imports nothing of the plugin) records the effective W_up/W_gate of the planted
  layer in every training forward and the stored bytes after every step; the trace is saved as
  ``TRACE_DIR/rank{RANK}.pt`` when training ends;
* ranks leave together: a barrier before ``destroy_process_group`` (dist_check's
  ``_leave_together``: under ZeRO-3 a rank that left early once broke rank 0's final save; the
  same without MacDrop);
* the Ray CPU shim (the Ray driver, on a machine without GPUs only): LLaMA-Factory 0.9.5 reserves
  its placement group with ``get_placement_group(total_devices)``, one ``{"CPU": 10}`` bundle per
  device of the cluster. On a GPU cluster that is one bundle per GPU; without GPUs the devices
  are the CPUs, so it asks for 10 CPUs per CPU, which no cluster has, and ``pg.ready()`` waits
  for ever, MacDrop or not. The shim reserves ``ray_num_workers`` bundles instead, as many as
  LLaMA-Factory's GPU path reserves on a cluster with that many GPUs (``ray_init_kwargs:
  {num_cpus: 10 * workers}`` makes them fit). Production code never does this.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

TRACE_DIR = os.environ.get("MACDROP_TEST_TRACE_DIR")
#: whether the plugin's start-up hook is loaded when this runs: only the .pth files run before
#: sitecustomize, so True means the .pth file activated the plugin in this interpreter
PTH_HOOK = "llamafactory_macdrop.plugin.startup" in sys.modules


def _ray_cpu_shim(tuner) -> None:
    from llamafactory.extras.misc import get_device_name

    if get_device_name() != "cpu" or not hasattr(tuner, "_ray_training_function"):
        return
    workers = {}
    run_ray, reserve = tuner._ray_training_function, tuner.get_placement_group

    def _ray_training_function(ray_args, config):
        workers["n"] = ray_args.ray_num_workers
        return run_ray(ray_args, config)

    def get_placement_group(total_devices):
        return reserve(workers.get("n", total_devices))

    tuner._ray_training_function = _ray_training_function
    tuner.get_placement_group = get_placement_group


def _spy(tuner) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from dist_check import PLANTED, Recorder

    inner = transformers.Trainer._inner_training_loop

    def loop(trainer, *args, **kwargs):
        recorder = Recorder(dict(PLANTED))
        recorder.trace["process"] = {
            "pid": os.getpid(),
            "pth_hook": PTH_HOOK,
            # what the hook did to this interpreter's LLaMA-Factory (the entry of a Ray worker)
            "training_function_patched": getattr(tuner._training_function, "__macdrop_patched__", False),
        }
        begin = recorder.on_train_begin

        def on_train_begin(targs, state, control, **kw):
            recorder.begin(trainer.model, trainer.model_wrapped)
            return begin(targs, state, control, **kw)

        recorder.on_train_begin = on_train_begin
        trainer.add_callback(recorder)
        try:
            return inner(trainer, *args, **kwargs)
        finally:
            os.makedirs(TRACE_DIR, exist_ok=True)
            torch.save(recorder.trace, os.path.join(TRACE_DIR, f"rank{os.environ.get('RANK', '0')}.pt"))

    transformers.Trainer._inner_training_loop = loop
    destroy = dist.destroy_process_group

    def destroy_after_barrier(*args, **kwargs):
        if dist.is_initialized():
            dist.barrier()
        return destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_after_barrier


class _Loader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _ray_cpu_shim(module)
        _spy(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader the other finders give (the plugin's start-up hook wraps it as well, and
    asks this finder back while it searches: hence the guard)."""

    busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "llamafactory.train.tuner" or self.busy:
            return None
        self.busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _Loader(spec.loader)
                    return spec
        finally:
            self.busy = False
        return None


if TRACE_DIR:
    sys.meta_path.insert(0, _Finder())

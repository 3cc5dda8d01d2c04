"""On PYTHONPATH for the vLLM peer on the network-namespace test bed: vLLM's CPU communicator then takes
its own torch.distributed (gloo) fallback instead of its shared-memory all-reduce.

The test bed's hosts share one kernel and /dev/shm, and vLLM 0.32's CPU communicator picks shared memory
whenever the ranks of a group agree on a segment name (it does not check that they are on one machine),
so without this its collectives would never cross the rate-limited link. The patch answers "no" to that
check, the branch vLLM takes when ranks cannot share a segment; the test bed's byte counters show the
result. Loaded in every vLLM process (its workers are spawned with this PYTHONPATH); it imports nothing
of vLLM until vLLM itself imports the communicator."""
import importlib.abc
import importlib.util
import sys

_TARGET = "vllm.distributed.device_communicators.cpu_communicator"


class _NoShm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.CpuCommunicator._all_group_ranks_share_shm_group_name = lambda self: False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoShm())

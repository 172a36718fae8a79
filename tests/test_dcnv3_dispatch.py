"""Choice of the DCNv3 implementation for CUDA tensors: the self-check, its cached verdict, the
fallback cuda -> triton -> reference with one warning per failed backend, DCNV3_BACKEND /
set_backend / DCNV3_SELF_CHECK, and torch.compile. The check and fallback logic takes the
device and the table of implementations, so it runs here on CPU with deliberately broken
implementations; the CPU C++ kernels stand in for a working compiled backend."""
import re
import warnings

import pytest
import torch

import ops_dcnv3
from ops_dcnv3 import dcnv3, dcnv3_reference, functions
from ops_dcnv3.functions import select_backend

CPU = torch.device("cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def wrong_values(*args, **kwargs):
    return dcnv3_reference(*args, **kwargs) * 1.001


def raises(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n(details)")


def wrong_offset_gradient(input, offset, mask, *params, **kwargs):
    # Right output, offset gradient doubled.
    return dcnv3(input, offset.detach() + 2 * (offset - offset.detach()), mask, *params, **kwargs)


def nan_output(*args, **kwargs):
    return dcnv3(*args, **kwargs) * float("nan")


class Counting:
    def __init__(self, implementation):
        self.implementation, self.calls = implementation, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.implementation(*args, **kwargs)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts with no backend chosen, checked or set, and no DCNV3_* variables."""
    monkeypatch.setattr(functions, "_verdicts", {})
    monkeypatch.setattr(functions, "_choices", {})
    monkeypatch.setattr(functions, "_backend_override", None)
    monkeypatch.delenv("DCNV3_BACKEND", raising=False)
    monkeypatch.delenv("DCNV3_SELF_CHECK", raising=False)


def test_wrong_values_and_exceptions_fall_back_to_the_reference_with_one_warning_each():
    table = {"cuda": wrong_values, "triton": raises, "reference": dcnv3_reference}
    with pytest.warns(RuntimeWarning) as record:
        choice = select_backend(CPU, table, "cuda", verdicts={})
    assert choice == "reference"
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith("ops_dcnv3: the 'cuda' DCNv3 backend failed its self-check on cpu: output "
                                  "(float64, softmax=False) differs from the reference by 0.001")
    assert "Falling back to 'triton'" in messages[0]
    assert messages[1].startswith("ops_dcnv3: the 'triton' DCNv3 backend failed its self-check on cpu: "
                                  "RuntimeError: CUDA error: no kernel image is available")
    assert "(details)" not in messages[1] and "Falling back to 'reference'" in messages[1]
    # What the fallback runs gives the reference's result.
    input, offset, mask = functions._self_check_problem(1, 6, 5, (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False))
    torch.testing.assert_close(table[choice](input, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, softmax=True),
                               dcnv3_reference(input, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, softmax=True))


@pytest.mark.parametrize("broken,what", [
    (wrong_offset_gradient, "grad_offset (float64, softmax=False) differs"),
    (nan_output, "output (float64, softmax=False) differs from the reference by nan"),
])
def test_broken_cuda_falls_back_to_a_working_triton(broken, what):
    message = re.escape("the 'cuda' DCNv3 backend failed its self-check on cpu: " + what)
    with pytest.warns(RuntimeWarning, match=message):
        assert select_backend(CPU, {"cuda": broken, "triton": dcnv3}, "cuda", verdicts={}) == "triton"


def test_working_backend_is_kept_silently_and_checked_once_per_device():
    counting = Counting(dcnv3)
    verdicts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(CPU, {"cuda": counting}, "cuda", verdicts=verdicts) == "cuda"
        calls = counting.calls
        assert calls == len(functions._SELF_CHECK_PROBLEMS)
        assert select_backend(CPU, {"cuda": counting}, "cuda", verdicts=verdicts) == "cuda"
    assert counting.calls == calls and verdicts == {("cuda", "cpu"): None}


def test_failed_verdict_is_cached_and_warned_once():
    counting = Counting(wrong_values)
    verdicts = {}
    with pytest.warns(RuntimeWarning):
        select_backend(CPU, {"cuda": counting, "triton": dcnv3}, "cuda", verdicts=verdicts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(CPU, {"cuda": counting, "triton": dcnv3}, "cuda", verdicts=verdicts) == "triton"
    assert counting.calls == 1


def test_preferred_triton_and_reference_skip_the_backends_before_them():
    counting = Counting(dcnv3)
    assert select_backend(CPU, {"cuda": raises, "triton": counting}, "triton", verdicts={}) == "triton"
    assert counting.calls > 0
    assert select_backend(CPU, {"cuda": raises, "triton": raises}, "reference", verdicts={}) == "reference"


def test_self_check_off_trusts_the_preferred_backend():
    counting = Counting(wrong_values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(CPU, {"cuda": counting}, "cuda", self_check=False, verdicts={}) == "cuda"
    assert counting.calls == 0


def test_check_is_independent_of_the_callers_modes():
    # The first call may come under inference mode, no_grad or autocast: the check must still
    # compute gradients in the problem's own dtypes.
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(CPU, {"cuda": dcnv3}, "cuda", verdicts={}) == "cuda"
    with torch.no_grad():
        assert functions._self_check_error(dcnv3, CPU) is None


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="set_backend\\(name\\) must be one of cuda, triton, reference, got 'cudnn'"):
        ops_dcnv3.set_backend("cudnn")
    monkeypatch.setenv("DCNV3_BACKEND", "Triton")
    with pytest.raises(ValueError, match="DCNV3_BACKEND must be one of cuda, triton, reference, got 'Triton'"):
        ops_dcnv3.get_backend("cuda:0")
    with pytest.raises(ValueError, match="the backend must be one of"):
        select_backend(CPU, {}, "gpu")


def test_env_setter_and_self_check_switch_choose_the_cuda_backend(monkeypatch):
    # No CUDA work happens here: the checks are off or not needed.
    monkeypatch.setenv("DCNV3_SELF_CHECK", "0")
    monkeypatch.setenv("DCNV3_BACKEND", "triton")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert ops_dcnv3.get_backend("cuda:0") == "triton"
    ops_dcnv3.set_backend("reference")  # the setter wins over the environment, and resets the choices
    assert ops_dcnv3.get_backend("cuda:0") == "reference"
    ops_dcnv3.set_backend(None)
    assert ops_dcnv3.get_backend("cuda:1") == "triton"
    assert ops_dcnv3.get_backend("cpu") == "cpu"


def test_cpu_tensors_always_use_the_cpp_kernels(monkeypatch):
    monkeypatch.setenv("DCNV3_BACKEND", "reference")
    ops_dcnv3.set_backend("triton")
    monkeypatch.setattr(functions, "select_backend", raises)  # no choice is made for CPU tensors
    input, offset, mask = functions._self_check_problem(1, 5, 5, (3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False))
    params = (3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False, True)
    assert torch.equal(dcnv3(input, offset, mask, *params), torch.ops.ops_dcnv3.dcnv3_forward(input, offset, mask,
                                                                                              *params))


def test_torch_compile_fullgraph_makes_the_choice_once_while_tracing(monkeypatch):
    # The CUDA branch of dcnv3 asks _chosen_backend, which torch.compile runs (self-check and
    # all) while tracing and keeps as a constant. Here its choice is made on the CPU.
    counting = Counting(dcnv3)
    monkeypatch.setattr(functions, "get_backend",
                        lambda device: select_backend(CPU, {"cuda": counting}, "cuda", verdicts={}))

    def scaled(x):
        return x * len(functions._chosen_backend(0))

    compiled = torch.compile(scaled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 4.0))
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 4.0))
    assert counting.calls == len(functions._SELF_CHECK_PROBLEMS)


@needs_gpu
@pytest.mark.parametrize("backend", functions.CUDA_BACKENDS)
def test_each_backend_on_the_gpu_passes_its_check_and_matches_the_reference(backend):
    ops_dcnv3.set_backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops_dcnv3.get_backend() == backend
    input, offset, mask = functions._self_check_problem(2, 9, 8, (3, 3, 1, 1, 1, 1, 1, 1, 4, 16, 1.0, False))
    params = (3, 3, 1, 1, 1, 1, 1, 1, 4, 16, 1.0, False)
    module_path = dcnv3(input.cuda(), offset.cuda(), mask.cuda(), *params, softmax=True).cpu()
    torch.testing.assert_close(module_path, dcnv3_reference(input, offset, mask, *params, softmax=True))

"""What the grading tests share: a comparison whose failure message says what was expected.

The grading tests (one file per part of assignment.py) reach the code through its public functions only, so that any
correct plain implementation passes them. Each compares with torchvision where torchvision has the operation, and with
small examples worked out by hand (in the comments) otherwise.
"""
import torch


def show(t, limit=12):
    """A tensor as a short, readable value: the numbers when few, the shape and the first numbers otherwise."""
    if not isinstance(t, torch.Tensor):
        return repr(t)
    values = [round(v, 4) if isinstance(v, float) else v for v in t.detach().flatten()[:limit].tolist()]
    if t.numel() <= limit:
        return f"{values} (shape {tuple(t.shape)})"
    return f"shape {tuple(t.shape)} starting {values}..."


def expect_close(actual, expected, what, atol=1e-5, rtol=1e-5):
    """Fail with 'what: expected ..., got ...' unless actual equals expected (shape and values, up to tolerance)."""
    expected = torch.as_tensor(expected)
    try:
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"not a tensor: {type(actual).__name__}")
        torch.testing.assert_close(actual, expected.to(actual.dtype) if actual.dtype.is_floating_point and
                                   expected.dtype.is_floating_point else expected, atol=atol, rtol=rtol,
                                   check_dtype=False)
    except (AssertionError, TypeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        where = worst(actual, expected)
        raise AssertionError(f"{what}: expected {show(expected)}, got {show(actual)} ({reason}{where})") from None


def worst(actual, expected):
    """', most different at index (i, j, ...): expected a, got b' for two tensors of one shape, else ''."""
    if not (isinstance(actual, torch.Tensor) and actual.shape == expected.shape and actual.numel()):
        return ""
    a, b = actual.detach().double(), expected.double()
    diff = torch.where(torch.isnan(a) != torch.isnan(b), torch.inf, (a - b).abs().nan_to_num(0.0))
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"; most different at index {index}: expected {b[index].item():.6g}, got {a[index].item():.6g}"

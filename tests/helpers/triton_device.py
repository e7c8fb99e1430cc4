"""Where the Triton tests run their kernels: natively on CUDA where a GPU exists, else under Triton's
interpreter on CPU tensors (tests/conftest.py turns it on). Inputs are drawn on the CPU, with a fresh
generator, and moved with ``on_device``, so the same test runs both ways."""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter


def on_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors where the Triton kernels run them: CUDA where it exists, else the CPU (interpreter)."""
    return tuple(t.to(DEVICE) for t in tensors)


def fresh_generator() -> torch.Generator:
    """A CPU generator seeded from the OS's entropy (inputs differ on every run)."""
    gen = torch.Generator()
    gen.seed()
    return gen


def spy_on_grad_x_requests(monkeypatch) -> list[bool]:
    """Record need_x of every call of the Triton sparse encoders' backward (``sparse_encoder_backward_triton``,
    which copies W_enc transposed and gathers its columns only when grad x is asked for): returns the
    list the calls append to."""
    from sparsekit.kernels import encode

    asked = []
    real = encode.sparse_encoder_backward_triton

    def spy(grad_kept, rows, cols, x, W_enc, need_x, need_weights, deterministic):
        asked.append(need_x)
        return real(grad_kept, rows, cols, x, W_enc, need_x, need_weights, deterministic)

    monkeypatch.setattr(encode, "sparse_encoder_backward_triton", spy)
    return asked

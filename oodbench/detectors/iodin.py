"""iODIN, as OpenOOD v1.5's `iodin` postprocessor (`openood/postprocessors/iodin_postprocessor.py`,
`configs/postprocessors/iodin.yml`): ODIN with the input perturbed in one value per image only.

Per image: the gradient of the cross-entropy of the temperature-scaled logits z/T against the predicted class w.r.t.
the normalised input; the single input value (over channels and pixels) of largest |gradient| moves by
−ε·s/std_c, s = +1 where the gradient is ≥ 0, else −1 (OpenOOD's `torch.ge` sign), std_c its channel's std; the score
is −max softmax(z'/T) of the perturbed input. Cost: one forward and backward pass and one more forward pass per
batch, as ODIN (scores need input gradients, so they are not computed from stored features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oodbench.detectors.base import Option, register
from oodbench.detectors.classifier import ODIN
from oodbench.errors import OODBenchError


@register("iodin")
class IODIN(ODIN):
    summary = "ODIN perturbing only the input value of largest gradient per image (OpenOOD v1.5 iodin)"
    OPTIONS = {"temperature": Option(1000.0, "softmax temperature T (iodin.yml)", grid=(1.0, 10.0, 100.0, 1000.0)),
               "epsilon": Option(0.0014, "size of the one value's step, in [0,1] pixel units before normalisation "
                                         "(iodin.yml `noise`)", grid=(0.0014, 0.0028))}

    def outputs(self, x):
        model, t, eps = self.require_model(), float(self.options["temperature"]), float(self.options["epsilon"])
        if not t > 0:
            raise OODBenchError(f"iodin.temperature must be > 0, got {t:g}")
        std = torch.tensor(model.std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
        with torch.enable_grad():
            inp = model.prepare(x).requires_grad_(True)
            logits = model.net(inp).float() / t
            loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, inp)
        flat = grad.abs().flatten(1)
        mask = torch.zeros_like(flat).scatter_(1, flat.argmax(1, keepdim=True), 1.0).view_as(grad)
        step = ((grad >= 0).float() * 2 - 1) / std
        with torch.no_grad():
            return {"odin_logits": model.net(inp.detach() - eps * step * mask).float()}

    def outputs_key(self):
        return ("iodin", float(self.options["temperature"]), float(self.options["epsilon"]))

"""Build resnet50_cbam through timm, print its parameter count and run one forward pass."""

import timm
import torch

import visattn

model = timm.create_model('resnet50_cbam').eval()
print(f'resnet50_cbam: {sum(p.numel() for p in model.parameters()):,} parameters')
with torch.no_grad():
    logits = model(torch.randn(1, 3, 224, 224))
print(f'forward: input [1, 3, 224, 224] -> logits {list(logits.shape)}')
print(f'visattn {visattn.__version__}: {len(visattn.list_attn())} blocks, {len(visattn.list_models())} timm models')

import torch

from sop_lightning.heads import ProjectionHead, PrototypeLayer


def test_projection_head_shapes_and_unit_norm():
    head = ProjectionHead(32, 64, 16)
    out = head(torch.randn(5, 7, 32))
    assert out.shape == (5, 7, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, 7))
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all((m.bias == 0).all() for m in linears)


def test_prototype_layer_weight_norm_and_norms():
    layer = PrototypeLayer(16, 10, norm_last_layer=True)
    gain = layer.last_layer.weight_g
    assert not gain.requires_grad
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(10))
    y = torch.randn(4, 16)
    torch.testing.assert_close(layer(y), y @ layer.weight.T)

    free = PrototypeLayer(16, 10, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    with torch.no_grad():
        free.last_layer.weight_g.copy_(torch.arange(1.0, 11.0).view(10, 1))
    torch.testing.assert_close(free.norms, torch.arange(1.0, 11.0))
    torch.testing.assert_close(free.weight.norm(dim=1), torch.arange(1.0, 11.0))
    # gradients reach the norms
    free(y).sum().backward()
    assert free.last_layer.weight_g.grad is not None

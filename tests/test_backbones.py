import pytest
import timm
import torch

from sop_lightning.backbones import ViTBackbone

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def test_no_mask_equals_timm_forward_features():
    torch.manual_seed(0)
    b = ViTBackbone("vit_small_patch16_224", **SMALL)
    x = torch.randn(3, 3, 32, 32)
    ref = b.vit.forward_features(x)
    out = b(x)
    torch.testing.assert_close(out.cls, ref[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.patches, ref[:, 1:], rtol=0, atol=0)
    # and a plain timm model with the same weights agrees too
    plain = timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True, **SMALL)
    plain.load_state_dict(b.vit.state_dict())
    torch.testing.assert_close(plain.forward_features(x), ref, rtol=0, atol=0)


def test_other_resolutions_work():
    b = ViTBackbone("vit_small_patch16_224", **SMALL)
    for size in (16, 24, 48):
        out = b(torch.randn(2, 3, size, size))
        assert out.patches.shape == (2, (size // 8) ** 2, 48)


def test_mask_token_replaces_patch_embedding_before_position():
    torch.manual_seed(0)
    b = ViTBackbone("vit_small_patch16_224", **SMALL).eval()
    with torch.no_grad():
        b.mask_token.normal_()
    x1, x2 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    # fully masked: the image content no longer matters
    torch.testing.assert_close(b(x1, mask).patches, b(x2, mask).patches)
    # reference: tokens = where(mask, token, patch_embed) + pos_embed, built by hand
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    emb = b.vit.patch_embed(x1)  # (1, 4, 4, D)
    emb[0, 1, 2] = b.mask_token[0]
    seq = torch.cat([b.vit.cls_token, emb.reshape(1, 16, -1)], 1) + b.vit.pos_embed
    ref = b.vit.norm(b.vit.blocks(seq))
    torch.testing.assert_close(b.tokens(x1, mask), ref, rtol=1e-5, atol=1e-5)
    # masked positions keep their position: two different masked cells give different outputs
    assert not torch.allclose(b(x1, torch.ones(1, 4, 4, dtype=torch.bool)).patches[0, 0],
                              b(x1, torch.ones(1, 4, 4, dtype=torch.bool)).patches[0, 5])  # fmt: skip


def test_errors():
    with pytest.raises(ValueError, match="not a timm model"):
        ViTBackbone("vit_does_not_exist")
    with pytest.raises(ValueError, match="img_size=30 must be divisible by patch_size=8"):
        ViTBackbone("vit_small_patch16_224", img_size=30, patch_size=8)
    b = ViTBackbone("vit_small_patch16_224", **SMALL)
    with pytest.raises(ValueError, match="multiples of 8x8"):
        b(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="mask of shape"):
        b(torch.randn(1, 3, 32, 32), torch.zeros(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        ViTBackbone("resnet18")
    with pytest.raises(ValueError, match="mlp_ratio must be > 0, got 0"):
        ViTBackbone("vit_small_patch16_224", **SMALL, mlp_ratio=0)


def test_mlp_ratio_sets_the_mlp_width_and_exports():
    b = ViTBackbone("vit_small_patch16_224", **SMALL, mlp_ratio=2)
    # 48 x 2 hidden units in every block: the parameter count of a ViT written out by hand
    assert all(blk.mlp.fc1.out_features == 96 for blk in b.vit.blocks)
    d, n_tokens = 48, 16 + 1
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 2 * d + 2 * d) + (2 * d * d + d)
    stem = 3 * 8 * 8 * d + d + d + n_tokens * d + 2 * d  # patch conv, [CLS], positions, final norm
    assert sum(p.numel() for p in b.vit.parameters()) == stem + 2 * per_block
    rebuilt = timm.create_model(**b.timm_kwargs())
    rebuilt.load_state_dict(b.vit.state_dict(), strict=True)

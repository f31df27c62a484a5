"""The whole model against torchvision's maskrcnn_resnet50_fpn, converted into the tv_maskrcnn_v1 preset.

Same random weights, same input: the same proposals, boxes, scores, labels and pasted masks, and in training the
same losses. Then the paper's presets: they build, train on an image with no objects, and infer nothing gracefully.
"""
import pytest
import torch

from model import PRESETS, build_model, convert_torchvision_state_dict

tv = pytest.importorskip("torchvision")
from torchvision.models.detection import MaskRCNN as TVMaskRCNN            # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.models.detection.image_list import ImageList              # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d                          # noqa: E402

NUM_CLASSES = 3          # with 3 classes random weights score ~1/3 > 0.05, so detections survive the threshold
SIZES = [(320, 416), (288, 384)]


def randomize_frozen_bn(module, generator):
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def make_pair():
    """torchvision's v1 Mask R-CNN (FrozenBN ResNet-50, 3 trainable stages) and ours with its weights."""
    torch.manual_seed(0)
    body = tv.models.resnet50(norm_layer=FrozenBatchNorm2d)
    theirs = TVMaskRCNN(_resnet_fpn_extractor(body, trainable_layers=3), num_classes=NUM_CLASSES)
    with torch.no_grad():
        randomize_frozen_bn(theirs, torch.Generator().manual_seed(1))
        theirs.rpn.head.cls_logits.weight.mul_(30)   # spread the objectness logits: fewer exact score ties
    ours = build_model("tv_maskrcnn_v1", num_classes=NUM_CLASSES)
    ours.load_state_dict(convert_torchvision_state_dict(theirs.state_dict()))
    images = torch.zeros(2, 3, 320, 416)
    torch.manual_seed(2)
    for img, (h, w) in zip(images, SIZES):
        img[:, :h, :w] = torch.randn(3, h, w)
    return theirs, ours, images


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def by_box(boxes):
    """Row order sorted by (x1, y1, x2, y2): outputs equal up to the order of exactly tied scores compare equal."""
    order = torch.arange(len(boxes))
    for col in (3, 2, 1, 0):
        order = order[torch.sort(boxes[order, col], stable=True)[1]]
    return order


def test_parameter_count_matches_torchvision(pair):
    theirs, ours, _ = pair
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in build_model("tv_maskrcnn_v1", 91).parameters()) == 44_401_393  # torchvision docs


@torch.no_grad()
def test_inference_equals_torchvision(pair):
    theirs, ours, images = pair
    theirs.eval(), ours.eval()
    image_list = ImageList(images, SIZES)
    features = theirs.backbone(images)
    tv_proposals, _ = theirs.rpn(image_list, features)
    tv_detections, _ = theirs.roi_heads(features, tv_proposals, SIZES)
    tv_detections = theirs.transform.postprocess(tv_detections, SIZES, SIZES)   # pastes the masks

    P = list(ours.fpn(ours.backbone(images)).values())
    for ours_p, tv_p in zip(P, features.values()):
        torch.testing.assert_close(ours_p, tv_p, rtol=1e-4, atol=1e-4)
    proposals, _ = ours.rpn(P, tuple(images.shape[-2:]), SIZES)
    for a, b in zip(proposals, tv_proposals):
        assert a.shape == b.shape and len(a) > 100
        torch.testing.assert_close(a[by_box(a)], b[by_box(b)], rtol=1e-4, atol=1e-3)

    detections = ours(images, SIZES)
    for ours_d, tv_d in zip(detections, tv_detections):
        assert len(ours_d["boxes"]) > 10
        i, j = by_box(ours_d["boxes"]), by_box(tv_d["boxes"])
        assert torch.equal(ours_d["labels"][i], tv_d["labels"][j])
        torch.testing.assert_close(ours_d["boxes"][i], tv_d["boxes"][j], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(ours_d["scores"][i], tv_d["scores"][j], rtol=1e-4, atol=1e-5)
        assert ours_d["masks"].shape == tv_d["masks"].shape
        torch.testing.assert_close(ours_d["masks"][i], tv_d["masks"][j], rtol=1e-3, atol=1e-3)


def test_training_losses_equal_torchvision(pair):
    theirs, ours, images = pair
    theirs.train(), ours.train()
    targets = []
    for h, w in SIZES:
        boxes = torch.tensor([[20.0, 30.0, 180.0, 200.0], [150.0, 40.0, 300.0, 250.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 40:190, 30:170] = 1
        masks[1, 50:240, 160:290] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, *SIZES[1], dtype=torch.uint8)}                 # an image with no objects
    torch.manual_seed(3)  # both samplers draw the same random permutations in the same order
    image_list = ImageList(images, SIZES)
    features = theirs.backbone(images)
    tv_proposals, tv_rpn = theirs.rpn(image_list, features, targets)
    _, tv_roi = theirs.roi_heads(features, tv_proposals, SIZES, targets)
    torch.manual_seed(3)
    losses = ours(images, SIZES, targets)
    names = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_box", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_box", "loss_mask": "loss_mask"}
    assert set(losses) == set(names.values())
    for tv_name, value in {**tv_rpn, **tv_roi}.items():
        torch.testing.assert_close(losses[names[tv_name]], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "r50_fpn_gn"])
def test_presets_train_on_empty_images_and_detect_nothing_gracefully(preset):
    torch.manual_seed(0)
    model = build_model(preset, num_classes=4)
    images = torch.randn(1, 3, 64, 96)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 64, 96, dtype=torch.uint8)}]
    losses = model(images, [(64, 96)], empty)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    model.roi_heads.score_thresh = 1.1          # nothing can pass: zero detections
    (out,) = model(images, [(64, 96)], original_sizes=[(32, 48)])
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 1, 32, 48)


def test_boxes_stay_float32_under_bf16_autocast():
    # bf16 keeps 8 significant bits: x = 1001.3 would become 1000. The convolutions run in bf16, the anchors,
    # proposals, the RoIs the heads are trained on and the detections stay float32.
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3)
    images, sizes = torch.randn(1, 3, 128, 160), [(128, 160)]
    target = [{"boxes": torch.tensor([[10.3, 20.7, 90.1, 100.9]]), "labels": torch.tensor([1]),
               "masks": torch.ones(1, 128, 160, dtype=torch.uint8)}]
    seen = []
    model.roi_heads.register_forward_pre_hook(lambda module, args: seen.append(args[1]))  # args[1]: proposals
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.features(images)
        losses = model(images, sizes, target)
        model.eval()
        (out,) = model(images, sizes)
    assert features[0].dtype == torch.bfloat16 and all(torch.isfinite(v) for v in losses.values())
    assert [p.dtype for p in seen[0] + seen[1]] == [torch.float32] * 2 and out["boxes"].dtype == torch.float32


def test_presets_are_what_the_paper_says():
    gn = build_model("r50_fpn_gn", num_classes=81)
    names = {type(m).__name__ for m in gn.modules()}
    assert "GroupNorm" in names and not names & {"FrozenBatchNorm2d", "BatchNorm2d"}
    for preset in ("r50_fpn_gn", "r101_fpn_gn", "r50_fpn_gn_kp"):                 # GN(32) everywhere (Sec. 4)
        layers = build_model(preset, num_classes=81).modules()
        assert {m.num_groups for m in layers if type(m).__name__ == "GroupNorm"} == {32}, preset
    assert all(p.requires_grad for p in gn.parameters())                       # freeze_at = 0: scratch
    assert len(gn.roi_heads.box_head.convs) == 4 and len(gn.roi_heads.box_head.fcs) == 1   # 4conv1fc
    assert PRESETS["r101_fpn_gn"]["depth"] == 101
    syncbn = build_model("r50_fpn_syncbn", num_classes=81)
    assert "SyncBatchNorm" in {type(m).__name__ for m in syncbn.modules()}


def test_unknown_preset_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("r50_fpn_nope", num_classes=3)
    with pytest.raises(ValueError, match="unknown model option"):
        build_model("tiny", num_classes=3, colour="red")


def test_vgg16_faster_is_faster_rcnn_without_any_normalization():
    # Rethinking Sec. 5 "Models without BN/GN": VGG-16, no FPN, one RPN level, fc6/fc7, no mask head
    model = build_model("vgg16_faster", num_classes=81)
    kinds = {type(m).__name__ for m in model.modules()}
    assert not {k for k in kinds if "Norm" in k}                     # no BN, GN, FrozenBN, SyncBN anywhere
    assert model.fpn is None and model.roi_heads.mask_head is None
    assert model.rpn.anchor_generator.sizes == [(128, 256, 512)] and model.rpn.head.cls_logits.out_channels == 9
    assert [fc.out_features for fc in model.roi_heads.box_head.fcs] == [4096, 4096]
    assert model.roi_heads.box_head.fcs[0].in_features == 512 * 7 * 7            # RoIAlign 7x7 on conv5_3
    fc6 = model.roi_heads.box_head.fcs[0].weight
    assert fc6.std().item() == pytest.approx((2 / fc6.shape[1]) ** 0.5, rel=0.02)   # MSRA
    with pytest.raises(ValueError, match="no normalization"):
        build_model("vgg16_faster", num_classes=3, norm="gn")


def test_vgg16_faster_trains_and_detects_on_a_small_image():
    torch.manual_seed(0)
    # thinner fc6/fc7 and fewer RoIs keep the test fast; the layers are the preset's
    model = build_model("vgg16_faster", num_classes=3, box_fc_dim=256, roi_batch_size_per_image=64,
                        rpn_post_nms_top_n_test=100)
    images = torch.randn(1, 3, 96, 128)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 80.0]]), "labels": torch.tensor([2]),
                "masks": torch.zeros(1, 96, 128, dtype=torch.uint8)}]
    losses = model(images, [(96, 128)], targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    sum(losses.values()).backward()
    assert model.backbone.features[0].weight.grad.abs().sum() > 0     # conv1_1 learns: nothing frozen
    model.eval()
    with torch.no_grad():
        (out,) = model(images, [(96, 128)], original_sizes=[(48, 64)])
    D = out["boxes"].shape[0]
    assert D > 0 and out["scores"].shape == (D,) and out["labels"].shape == (D,) and "masks" not in out
    assert out["boxes"][:, 2].max() <= 64 and out["boxes"][:, 3].max() <= 48


def test_x152_preset_is_resnext152_8x32d_gn():
    model = build_model("x152_fpn_gn", num_classes=81)
    backbone = model.backbone
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]    # ResNet-152
    assert backbone.layer1[0].conv2.groups == 8 and backbone.layer1[0].conv2.out_channels == 8 * 32   # 8x32d
    assert "GroupNorm" in {type(m).__name__ for m in model.modules()}
    # the same tensors as torchvision's ResNet built with these groups and widths (GN in place of BN), fc aside
    theirs = tv.models.resnet.ResNet(tv.models.resnet.Bottleneck, [3, 8, 36, 3], groups=8, width_per_group=32,
                                     norm_layer=lambda c: torch.nn.GroupNorm(32, c))
    assert ({k: v.shape for k, v in backbone.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("fc.")})
    assert sum(p.numel() for p in backbone.parameters()) == 164_726_080       # 2.8x R101's 42.5M
    assert sum(p.numel() for p in model.parameters()) == 186_933_557          # with 81 classes (model.py)

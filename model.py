"""Mask R-CNN: backbone -> FPN -> RPN -> RoI heads, and the named presets of the paper.

He, Girshick, Dollár, "Rethinking ImageNet Pre-training" (arXiv:1811.08883), Sec. 4: Mask R-CNN with a ResNet or
ResNeXt + FPN backbone, with GroupNorm (or SyncBN) in the backbone, the FPN and both heads, trained from random
initialization. He et al., "Mask R-CNN" (arXiv:1703.06870) Sec. 3 for the heads.

Shapes: N images, (H, W) the padded batch, (h, w) one image's size before padding, R detections per image.

    images (N, 3, H, W) --backbone--> C2..C5 --fpn--> P2..P6 --rpn--> proposals --roi_heads--> detections

Without FPN (the VGG-16 Faster R-CNN of Rethinking Sec. 5, "Models without BN/GN") the RPN and the RoI heads read the
backbone's one map (conv5_3, stride 16); without a mask head it is Faster R-CNN. With cascade=True the RoI heads are
Cascade R-CNN's (cascade.py).
"""
import re

from torch import nn

import fast_ops
from backbone import RESNET_LAYERS, VGG16, ResNet
from cascade import CascadeRoIHeads
from fpn import FPN
from keypoints import KeypointHead
from masks import MaskHead, paste_masks
from roi_heads import BoxHead, BoxPredictor, RoIHeads
from rpn import RPN

# Every preset is a plain set of keyword arguments for `build_model`; `**overrides` replaces any of them. Except
# IMAGE_SIZE_KEYS: the image size a preset is trained and tested at by default, which train.py hands to data.py
# (resizing happens there, not in the model).
IMAGE_SIZE_KEYS = ("min_size", "max_size")
PAPER_MIN_SIZE, PAPER_MAX_SIZE = 800, 1333  # Sec. 4: shorter side 800; Detectron's cap on the longer side
_PAPER = dict(
    backbone="resnet",                                  # or "vgg16"
    depth=50, groups=1, width_per_group=64, stem_channels=64, base_planes=64,
    norm="gn", num_groups=32, freeze_at=0,             # Sec. 4: GN everywhere, nothing frozen (scratch)
    fpn_channels=256, fpn_norm="gn",                    # GN in the FPN-specific layers [Detectron GN baselines]
    anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
    rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
    rpn_batch_size_per_image=256, roi_batch_size_per_image=512,
    box_num_convs=4, box_num_fcs=1, box_conv_dim=256, box_fc_dim=1024, head_norm="gn",  # 4conv1fc + GN
    box_loss_beta=1.0,                                  # smooth-L1 of the box head, Detectron's (torchvision: 1/9)
    mask_head=True, mask_num_convs=4, mask_conv_dim=256,  # mask_head=False: Faster R-CNN (boxes only)
    num_keypoints=0, kp_num_convs=8, kp_conv_dim=512,  # Mask R-CNN Sec. 5 keypoint head; 0 keypoints: none
    aligned=False,                                      # Detectron's RoIAlign (not D2's ROIAlignV2)
    cascade=False,                                      # True: Cascade R-CNN's 3 box stages (Sec. 5, cascade.py)
    min_size=PAPER_MIN_SIZE, max_size=PAPER_MAX_SIZE,   # Sec. 4: shorter side 800; Detectron's cap on the longer
)

PRESETS = {
    "r50_fpn_gn": _PAPER,
    "r101_fpn_gn": dict(_PAPER, depth=101),
    # Table 3: "ResNeXt-152 8x32d" + GN, read as 8 groups of 32 channels (see backbone.py for the other reading).
    # The paper gives no parameter count, only "~4x more FLOPs than R101": the backbone's convs here take 4.2x the
    # multiply-adds of R101's at 224x224 (33.1 vs 7.8 G; the 32x8d reading: 3.1x). 186.9M parameters with 81
    # classes (backbone 164.7M). The 50.9 AP system adds --train-scales 640,800, --cascade and test augmentation.
    "x152_fpn_gn": dict(_PAPER, depth=152, groups=8, width_per_group=32),
    # Sec. 5.2, PASCAL VOC: Faster R-CNN R101-FPN with GN, i.e. the same model without the mask head.
    "r101_fpn_gn_faster": dict(_PAPER, depth=101, mask_head=False),
    "r50_fpn_syncbn": dict(_PAPER, norm="syncbn", fpn_norm="syncbn", head_norm="syncbn"),
    # The classic pre-trained baseline, Detectron's R50-FPN "BN*" (2x: 38.6 box / 34.5 mask AP): frozen BN in the
    # backbone, stem + res2 frozen, no norm in FPN and heads, the 2fc box head (Detectron's GN baselines list a
    # BN* 4conv1fc variant too: 38.8 / 34.4).
    "r50_fpn_frozenbn": dict(_PAPER, norm="frozen_bn", freeze_at=2, fpn_norm="none", head_norm="none",
                             box_num_convs=0, box_num_fcs=2),
    # torchvision's maskrcnn_resnet50_fpn (v1) exactly: FrozenBN, 2fc box head, plain mask head, aligned=False, its
    # RPN keeps 2000 proposals per image in training, box smooth-L1 beta 1/9. Its weights load as they are
    # (convert_torchvision_state_dict); a random init differs in the box head's fcs and predictor (Detectron's).
    "tv_maskrcnn_v1": dict(_PAPER, norm="frozen_bn", freeze_at=2, fpn_norm="none", head_norm="none",
                           box_num_convs=0, box_num_fcs=2, rpn_post_nms_top_n_train=2000, box_loss_beta=1 / 9),
    # Small enough to train on a 2-core CPU in minutes; same architecture, fewer and thinner layers.
    # Departures: one block per stage, a quarter of the channels (C2..C5 = 64..512), 8 GN groups (so they divide
    # 16 channels), 64-channel FPN and heads, 2-conv heads, anchors halved for the small synthetic images.
    # Images of real data (PennFudanPed, COCO) at 320 / 533 px, the paper's 800 / 1333 scaled by 0.4: at 800 px a
    # 20-iteration PennFudanPed run took 13 minutes and 4.5 GB on 2 CPU cores; 320 px has 6x fewer pixels. The
    # shapes demo keeps its native 128 px (train.py).
    "tiny": dict(_PAPER, depth=None, layers=(1, 1, 1, 1), base_planes=16, stem_channels=16, num_groups=8,
                 fpn_channels=64, anchor_sizes=(16, 32, 64, 128, 256),
                 rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=250,
                 rpn_pre_nms_top_n_test=250, rpn_post_nms_top_n_test=250,
                 rpn_batch_size_per_image=128, roi_batch_size_per_image=64,
                 box_num_convs=2, box_conv_dim=64, box_fc_dim=256, mask_num_convs=2, mask_conv_dim=64,
                 min_size=320, max_size=533),
    # Rethinking Sec. 5 "Models without BN/GN": the original Faster R-CNN VGG-16, no FPN, no normalization anywhere,
    # MSRA init, from scratch with scale augmentation (train.py --train-scales LO,HI; the paper gives no range).
    # One RPN level on conv5_3 (stride 16) with 3 sizes x 3 ratios (Faster R-CNN Sec. 3.1.1); RPN proposals as
    # py-faster-rcnn in training (12000 before NMS, 2000 after), 6000 / 1000 at test (py-faster-rcnn keeps 300);
    # RoIAlign 7x7 on conv5_3 (Faster R-CNN: RoIPool) and the fc6/fc7 head (4096, MSRA init with fan_in, see
    # build_model; no dropout: as Detectron's VGG16 head; py-faster-rcnn drops out 0.5 after each); no mask head; 512
    # sampled RoIs per image, as the FPN models (py-faster-rcnn: 128).
    "vgg16_faster": dict(_PAPER, backbone="vgg16", depth=None, norm="none", fpn_channels=None, fpn_norm="none",
                         anchor_sizes=((128, 256, 512),), rpn_pre_nms_top_n_train=12000,
                         rpn_post_nms_top_n_train=2000, rpn_pre_nms_top_n_test=6000,
                         box_num_convs=0, box_num_fcs=2, box_fc_dim=4096, head_norm="none", mask_head=False),
}
# Fig. 6: keypoint R-CNN, R50-FPN + GN, 17 COCO keypoints. As Detectron's keypoint model, no mask head.
PRESETS["r50_fpn_gn_kp"] = dict(_PAPER, mask_head=False, num_keypoints=17)
# The tiny model with a 4 x 64-channel keypoint head, for tests on a CPU.
PRESETS["tiny_kp"] = dict(PRESETS["tiny"], mask_head=False, num_keypoints=17, kp_num_convs=4, kp_conv_dim=64)


class MaskRCNN(nn.Module):
    """backbone -> FPN -> RPN -> RoI heads (roi_heads.RoIHeads or cascade.CascadeRoIHeads)."""

    plain_ops = False  # True (build_model(plain_ops=True)): masks.paste_masks instead of fast_ops.paste_masks

    def __init__(self, backbone, fpn, rpn, roi_heads):
        super().__init__()
        self.backbone, self.fpn, self.rpn, self.roi_heads = backbone, fpn, rpn, roi_heads

    def forward(self, images, image_sizes, targets=None, original_sizes=None):
        """images: (N, 3, H, W), normalized and padded; image_sizes: [(h, w)] before padding.

        Training returns a dict of named losses. Evaluation returns, per image, a dict with boxes (R, 4) as
        (x1, y1, x2, y2), labels (R,), scores (R,) and soft masks (R, 1, h, w) pasted into the image (with a mask
        head), keypoints (R, K, 3) as (x, y, 1) and keypoint_scores (R, K) (with a keypoint head), all in the
        pixels of image_sizes, or of original_sizes when given (the sizes before the data pipeline resized).
        """
        if self.training and targets is None:
            raise ValueError("MaskRCNN in training mode needs targets; call model.eval() for inference")
        image_shape = tuple(images.shape[-2:])
        features = self.features(images)
        proposals, rpn_losses = self.rpn(features, image_shape, image_sizes, targets)
        # FPN Sec. 4.2: the RoI heads pool from P2..P5; P6 only feeds the RPN. Without FPN both read the one map.
        out = self.roi_heads(features[:4], proposals, image_shape, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **out}
        return self.postprocess(out, image_sizes, original_sizes or image_sizes)

    def features(self, images):
        """[P2..P6] with FPN ((N, C, H/4, W/4), ...), else the backbone's maps (VGG-16: [conv5_3 (N, 512, H/16,
        W/16)])."""
        features = self.backbone(images)  # {"C2": .., "C5": ..} or VGG's {"C5": ..}
        if self.fpn is not None:
            features = self.fpn(features)  # {"P2": (N, C, H/4, W/4), ..., "P6"}
        return list(features.values())

    def detect_boxes(self, images, image_sizes, original_sizes=None):
        """Inference without the branches: per image {"boxes", "labels", "scores"} as forward gives them
        (test-time augmentation merges the views' boxes first and runs the mask branch on the merged ones, tta.py)."""
        image_shape = tuple(images.shape[-2:])
        features = self.features(images)
        proposals, _ = self.rpn(features, image_shape, image_sizes)
        detections = self.roi_heads.detect(features[:4], proposals, image_shape, image_sizes)
        return self.postprocess(detections, image_sizes, original_sizes or image_sizes)

    def mask_probs(self, images, image_sizes, boxes, labels):
        """The mask branch alone on given boxes [(D_i, 4)] in the pixels of image_sizes, of classes [(D_i,)]:
        [(D_i, 1, M, M)] probabilities, not pasted (test-time augmentation averages them first, tta.py)."""
        features = self.features(images)
        return self.roi_heads.mask_head.probs(features[:4], boxes, labels, tuple(images.shape[-2:]))

    def postprocess(self, detections, image_sizes, output_sizes):
        """Rescale boxes (and keypoints) from the network's input size to output_sizes; paste the 28x28 masks there."""
        paste = paste_masks if self.plain_ops else fast_ops.paste_masks
        results = []
        for det, (h, w), (out_h, out_w) in zip(detections, image_sizes, output_sizes):
            scale = det["boxes"].new_tensor([out_w / w, out_h / h, out_w / w, out_h / h])
            boxes = det["boxes"] * scale
            result = {"boxes": boxes, "labels": det["labels"], "scores": det["scores"]}
            if "mask_probs" in det:
                result["masks"] = paste(det["mask_probs"], boxes, (out_h, out_w))  # (R, 1, out_h, out_w)
            if "keypoints" in det:  # (R, K, 3) as (x, y, 1): x, y scale like the boxes
                result["keypoints"] = det["keypoints"] * scale.new_tensor([out_w / w, out_h / h, 1.0])
                result["keypoint_scores"] = det["keypoint_scores"]  # (R, K)
            results.append(result)
        return results


def build_model(preset, num_classes, plain_ops=False, attention=None, **overrides):
    """Build a named preset (see PRESETS) for num_classes classes, background included (81 for COCO).
    plain_ops: the paper's plain GroupNorm, NMS, proposal selection, RoIAlign, mask targets and mask pasting instead
    of the fast equivalents of fast_ops.py (equal up to float rounding, slower); how the model computes, not what, so
    not a preset option. attention: None (the paper), or "cbam" in every ResNet bottleneck (related_work.CBAM;
    related work, not a preset option either)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - (set(PRESETS[preset]) - set(IMAGE_SIZE_KEYS)) - {"layers"}  # sizes: data.py's
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)} for preset {preset!r}")
    cfg = dict(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    vgg = cfg["backbone"] == "vgg16"
    if vgg and cfg["norm"] != "none":
        raise ValueError(f"preset {preset!r}: VGG-16 has no normalization layers (Rethinking Sec. 5), so norm must "
                         f"be 'none', not {cfg['norm']!r}")
    if vgg and attention:
        raise ValueError(f"preset {preset!r}: attention {attention!r} sits in ResNet bottlenecks; VGG-16 has none")

    if vgg:
        backbone = VGG16()
    else:
        backbone = ResNet(layers=cfg.get("layers") or RESNET_LAYERS[cfg["depth"]], groups=cfg["groups"],
                          width_per_group=cfg["width_per_group"], stem_channels=cfg["stem_channels"],
                          base_planes=cfg["base_planes"], norm=cfg["norm"], num_groups=cfg["num_groups"],
                          freeze_at=cfg["freeze_at"], attention=attention)
    fpn = None
    if cfg["fpn_channels"]:
        fpn = FPN(in_channels=backbone.out_channels, out_channels=cfg["fpn_channels"], norm=cfg["fpn_norm"],
                  num_groups=cfg["num_groups"])
    channels = cfg["fpn_channels"] or backbone.out_channels[-1]  # without FPN, the last backbone map's channels
    rpn = RPN(in_channels=channels, anchor_sizes=cfg["anchor_sizes"], aspect_ratios=cfg["aspect_ratios"],
              batch_size_per_image=cfg["rpn_batch_size_per_image"],
              pre_nms_top_n_train=cfg["rpn_pre_nms_top_n_train"], post_nms_top_n_train=cfg["rpn_post_nms_top_n_train"],
              pre_nms_top_n_test=cfg["rpn_pre_nms_top_n_test"], post_nms_top_n_test=cfg["rpn_post_nms_top_n_test"])
    # Init departures from torchvision (the paper states none): the box head's fcs (XavierFill) and predictor
    # (N(0, 0.01) / N(0, 0.001)) and the mask deconv's and logits' biases (0) are Detectron's; torchvision keeps
    # nn.Linear / nn.Conv defaults there. The mask logits' MSRA init is Detectron's and torchvision's (detectron2:
    # N(0, 0.001)). tests/test_gn_twin.py checks the rest follows torchvision's rules.
    box_heads = [BoxHead(in_channels=channels, num_convs=cfg["box_num_convs"], conv_dim=cfg["box_conv_dim"],
                         num_fcs=cfg["box_num_fcs"], fc_dim=cfg["box_fc_dim"], norm=cfg["head_norm"],
                         num_groups=cfg["num_groups"]) for _ in range(3 if cfg["cascade"] else 1)]
    if vgg:  # fc6 / fc7 belong to VGG-16: MSRA init, forward form (He et al. 2015, Eq. 10: std sqrt(2 / fan_in))
        for head in box_heads:
            for fc in head.fcs:
                nn.init.kaiming_normal_(fc.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(fc.bias)
    mask_head = None
    if cfg["mask_head"]:
        mask_head = MaskHead(in_channels=channels, num_convs=cfg["mask_num_convs"], conv_dim=cfg["mask_conv_dim"],
                             norm=cfg["head_norm"], num_groups=cfg["num_groups"], num_classes=num_classes,
                             aligned=cfg["aligned"])
    keypoint_head = KeypointHead(in_channels=channels, num_keypoints=cfg["num_keypoints"],
                                 num_convs=cfg["kp_num_convs"], conv_dim=cfg["kp_conv_dim"], norm=cfg["head_norm"],
                                 num_groups=cfg["num_groups"], aligned=cfg["aligned"]) if cfg["num_keypoints"] else None
    if cfg["cascade"]:
        if keypoint_head is not None:
            raise ValueError(f"preset {preset!r}: the cascade has no keypoint head (Rethinking uses it for boxes "
                             f"and masks only)")
        roi_heads = CascadeRoIHeads(box_heads, num_classes, mask_head,
                                    batch_size_per_image=cfg["roi_batch_size_per_image"], aligned=cfg["aligned"],
                                    box_loss_beta=cfg["box_loss_beta"])
    else:
        roi_heads = RoIHeads(box_heads[0], BoxPredictor(box_heads[0].out_channels, num_classes), mask_head,
                             batch_size_per_image=cfg["roi_batch_size_per_image"], aligned=cfg["aligned"],
                             box_loss_beta=cfg["box_loss_beta"], keypoint_head=keypoint_head)
    model = MaskRCNN(backbone, fpn, rpn, roi_heads)
    for module in model.modules():  # plain_ops: the paper's plain ops instead of fast_ops.py's (--plain-ops)
        if hasattr(module, "plain_ops"):
            module.plain_ops = plain_ops
    return model


# torchvision's Mask R-CNN names -> ours: maskrcnn_resnet50_fpn (older torchvision names the mask convs
# mask_fcn1..4 and its FPN convs have no Sequential), and the GN-all / BN models built from its parts with a
# norm_layer, whose FPN and head blocks are Conv2dNormActivation: .0 the conv, .1 the norm.
_TORCHVISION_NAMES = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.(?:(\d)\.)?", lambda m: f"fpn.lateral_convs.{m[1]}.{m[2] or 0}."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.(?:(\d)\.)?", lambda m: f"fpn.output_convs.{m[1]}.{m[2] or 0}."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_heads.box_head.fcs.0."),  # TwoMLPHead (2fc)
    (r"^roi_heads\.box_head\.fc7\.", "roi_heads.box_head.fcs.1."),
    (r"^roi_heads\.box_head\.(\d+)\.(\d)\.", r"roi_heads.box_head.convs.\1.\2."),  # FastRCNNConvFCHead's convs
    (r"^roi_heads\.mask_head\.(\d)\.(\d)\.", r"roi_heads.mask_head.convs.\1.\2."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d)\.", lambda m: f"roi_heads.mask_head.convs.{int(m[1]) - 1}.0."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.deconv."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.mask_logits."),
]


def convert_torchvision_state_dict(state_dict):
    """Map a torchvision Mask R-CNN state dict onto our model of the same build: maskrcnn_resnet50_fpn onto
    build_model("tv_maskrcnn_v1", 91), and torchvision's GN-all model (GroupNorm in the ResNet, the FPN, a 4conv1fc
    FastRCNNConvFCHead and the mask head; bench.build_torchvision_twin) onto r50_fpn_gn, or the same built with
    BatchNorm onto r50_fpn_syncbn. Every tensor is mapped: the result loads with strict=True.

    With torchvision's published COCO weights (37.9 box / 34.6 mask AP) this code gives the same detections.
    BatchNorm's num_batches_tracked counters are kept (SyncBatchNorm has them; FrozenBatchNorm2d drops them on load).
    """
    # FastRCNNConvFCHead is one Sequential: num_convs conv blocks (box_head.i.0 conv, .1 norm), a Flatten, then
    # Linear and ReLU in turn, so fc j is box_head.(num_convs + 1 + 2j)
    num_convs = len({k.split(".")[2] for k in state_dict if re.match(r"^roi_heads\.box_head\.\d+\.\d\.", k)})
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TORCHVISION_NAMES:
            key = re.sub(pattern, replacement, key)
        key = re.sub(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$",
                     lambda m: f"roi_heads.box_head.fcs.{(int(m[1]) - num_convs - 1) // 2}.{m[2]}", key)
        converted[key] = value
    return converted


def build_for_data(preset, dataset, norm=None, cascade=False, plain_ops=False, attention=None):
    """A run's model, as train.py builds it and evaluate.py rebuilds it from the run's flags: build_model for the
    dataset's classes (background included), with norm (--norm) in the backbone, the FPN and the heads when given,
    the Cascade R-CNN heads with cascade (--cascade), and plain_ops (--plain-ops). The data decides the heads: box-only
    data (PASCAL VOC) gets no mask head, i.e. Faster R-CNN as in Rethinking Sec. 5.2; a keypoint preset predicts the
    dataset's keypoints (Fig. 6). attention: --attention (related work: "cbam", or None)."""
    return build_model(preset, num_classes=dataset.num_classes, plain_ops=plain_ops, attention=attention, norm=norm,
                       fpn_norm=norm, head_norm=norm, cascade=cascade, mask_head=None if dataset.has_masks else False,
                       num_keypoints=dataset.num_keypoints or None)

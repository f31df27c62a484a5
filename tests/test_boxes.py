"""boxes.py against torchvision.ops / torchvision's detection utilities, plus small hand-worked examples."""
import math

import pytest
import torch

import boxes as plain_ops
import fast_ops
from boxes import BalancedSampler, BoxCoder, Matcher, box_area, box_iou, clip_boxes, remove_small_boxes

tv = pytest.importorskip("torchvision")
from torchvision.models.detection import _utils as tv_utils  # noqa: E402


def random_boxes(n, size=200.0, max_side=60.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * max_side + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.fixture(params=[plain_ops, fast_ops], ids=["plain", "fast"])
def ops(request):
    """Runs an NMS test with the paper's greedy loop (boxes.nms, boxes.batched_nms) and with fast_ops'."""
    return request.param


def test_box_iou_hand_worked():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    # overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1); identical: 1; disjoint: 0; half of it: 2 / 4
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(box_area(b), torch.tensor([4.0, 4.0, 1.0, 2.0]))


def test_box_iou_matches_torchvision():
    a, b = random_boxes(50, seed=1), random_boxes(70, seed=2)
    torch.testing.assert_close(box_iou(a, b), tv.ops.box_iou(a, b), rtol=0, atol=0)
    assert box_iou(a, b[:0]).shape == (50, 0)


@pytest.mark.parametrize("n", [1, 7, 300, 2000])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision_random(n, threshold, ops):
    boxes = random_boxes(n, seed=n)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n + 1))
    assert torch.equal(ops.nms(boxes, scores, threshold), tv.ops.nms(boxes, scores, threshold))


def test_nms_matches_torchvision_with_tied_scores(ops):
    boxes = random_boxes(500, seed=3)
    scores = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(4)).float()  # many exact ties
    for threshold in (0.1, 0.5):
        assert torch.equal(ops.nms(boxes, scores, threshold), tv.ops.nms(boxes, scores, threshold))


def test_nms_10k_boxes_matches_torchvision(ops):
    boxes = random_boxes(10_000, size=800.0, max_side=200.0, seed=5)
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ops.nms(boxes, scores, 0.7), tv.ops.nms(boxes, scores, 0.7))


def test_nms_hand_made(ops):
    empty = ops.nms(torch.zeros((0, 4)), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    assert ops.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    # three identical boxes with equal scores: the first one in input order survives (stable sort, as torchvision)
    same = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    assert ops.nms(same, torch.ones(3), 0.5).tolist() == [0] == tv.ops.nms(same, torch.ones(3), 0.5).tolist()
    # IoU exactly 0.5 ([0,0,2,1] vs [0,0,1,1]): suppressed only when the threshold is below 0.5 (IoU > threshold)
    pair, pair_scores = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.9, 0.8])
    assert ops.nms(pair, pair_scores, 0.5).tolist() == [0, 1] == tv.ops.nms(pair, pair_scores, 0.5).tolist()
    assert ops.nms(pair, pair_scores, 0.49).tolist() == [0] == tv.ops.nms(pair, pair_scores, 0.49).tolist()
    # greedy chain: A suppresses B, B would suppress C, A does not touch C -> C survives because B was dropped.
    # Given in reverse score order, so the output must also be re-sorted: [A, C] = [2, 0].
    chain = torch.tensor([[20.0, 0.0, 30.0, 10.0], [10.0, 0.0, 20.0, 10.0], [5.0, 0.0, 15.0, 10.0]])  # C, B, A
    chain_scores = torch.tensor([0.7, 0.8, 0.9])  # IoU(A, B) = 5/15, IoU(B, C) = 0, IoU(A, C) = 0
    assert ops.nms(chain, chain_scores, 0.3).tolist() == [2, 0]
    long_chain = torch.tensor([[5.0 * i, 0.0, 5.0 * i + 10, 10.0] for i in range(9)])  # neighbours: IoU 1/3
    assert ops.nms(long_chain, torch.linspace(1, 0.1, 9), 0.3).tolist() == [0, 2, 4, 6, 8]


def test_batched_nms_matches_torchvision(ops):
    for n in (40, 3000):  # torchvision uses its offset trick below 1000 boxes and a per-class loop above
        boxes = random_boxes(n, seed=n)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(7))
        idxs = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(8))
        assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5), tv.ops.batched_nms(boxes, scores, idxs, 0.5))
    # identical boxes in different groups never suppress each other
    same = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    assert ops.batched_nms(same, torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 2]
    assert ops.batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


def reference_batched_nms(boxes, scores, idxs, threshold):
    """torchvision's nms once per group, kept boxes by decreasing score with ties in input order (our contract)."""
    keep = torch.zeros(scores.shape[0], dtype=torch.bool)
    for group in torch.unique(idxs):
        members = torch.where(idxs == group)[0]
        keep[members[tv.ops.nms(boxes[members], scores[members], threshold)]] = True
    kept = torch.where(keep)[0]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def test_batched_nms_many_groups_ties_and_identical_boxes(ops):
    g = torch.Generator().manual_seed(12)
    boxes = random_boxes(2500, size=300.0, max_side=80.0, seed=13)
    boxes[:40] = boxes[40]  # a group of identical boxes: all but the first suppressed
    scores = torch.randint(0, 6, (2500,), generator=g).float() / 5  # many exact ties, across and within groups
    idxs = torch.randint(0, 80, (2500,), generator=g)  # 80 classes, as per-class NMS at inference
    idxs[:41] = 81
    for threshold in (0.3, 0.5, 0.7):
        assert torch.equal(ops.batched_nms(boxes, scores, idxs, threshold),
                           reference_batched_nms(boxes, scores, idxs, threshold))


@pytest.mark.parametrize("block", [64, 3000, 1 << 24])
def test_fast_batched_nms_in_blocks_and_padded_by_group(block):
    # a small block forces several row blocks and, above one block, the padded-by-group path (one big group: not)
    g = torch.Generator().manual_seed(14)
    for groups in (1, 3, 20):
        boxes = random_boxes(600, size=200.0, max_side=60.0, seed=groups)
        scores = torch.randint(0, 50, (600,), generator=g).float()
        idxs = torch.randint(0, groups, (600,), generator=g) * 7  # sparse group ids
        assert torch.equal(fast_ops.batched_nms(boxes, scores, idxs, 0.5, block=block),
                           reference_batched_nms(boxes, scores, idxs, 0.5))
        assert torch.equal(fast_ops.nms(boxes, scores, 0.5, block=block), tv.ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("block", [50, 1 << 24])
def test_fast_padded_nms_matches_torchvision_per_row(block):
    g = torch.Generator().manual_seed(15)
    B, K = 7, 300
    boxes = random_boxes(B * K, size=200.0, max_side=60.0, seed=16).reshape(B, K, 4)
    scores = torch.randint(0, 20, (B, K), generator=g).float()  # ties
    valid = torch.rand(B, K, generator=g) > 0.3
    valid[2] = False  # an empty row
    boxes[3] = boxes[3, :1]  # a row of identical boxes: all but one suppressed
    valid[4, 150:] = False  # a row padded at its end, with garbage boxes in the padding
    boxes[4, 150:] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    keep = fast_ops.padded_nms(boxes, scores, valid, 0.5, block=block)
    assert keep.shape == (B, K) and not (keep & ~valid).any()
    for b in range(B):
        members = torch.where(valid[b])[0]
        expected = members[tv.ops.nms(boxes[b, members], scores[b, members], 0.5)]
        assert torch.equal(torch.where(keep[b])[0], torch.sort(expected).values)
    assert keep[3].sum() == 1 and keep[2].sum() == 0
    # rows of known lengths (all entries beyond are padding) give the same answer, paired only up to the length
    lengths = [300, 300, 300, 300, 150, 300, 300]
    order = [0, 1, 2, 3, 5, 6, 4]  # rows of equal length next to each other
    keep_lengths = fast_ops.padded_nms(boxes[order], scores[order], valid[order], 0.5, [lengths[b] for b in order],
                                       block=block)
    assert torch.equal(keep_lengths, keep[order])
    empty = fast_ops.padded_nms(torch.zeros(0, 5, 4), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 0.5)
    assert empty.shape == (0, 5)


def test_box_coder_round_trip_and_torchvision():
    gt, ref = random_boxes(100, seed=9), random_boxes(100, seed=10)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        coder, tv_coder = BoxCoder(weights), tv_utils.BoxCoder(weights)
        deltas = coder.encode(gt, ref)
        torch.testing.assert_close(deltas, tv_coder.encode_single(gt, ref), rtol=0, atol=0)
        torch.testing.assert_close(coder.decode(deltas, ref), gt, rtol=1e-5, atol=1e-4)
        class_deltas = torch.randn(100, 3, 4, generator=torch.Generator().manual_seed(11)) * 3  # (R, K, 4)
        expected = tv_coder.decode_single(class_deltas.reshape(100, 12), ref).reshape(100, 3, 4)
        torch.testing.assert_close(coder.decode(class_deltas, ref), expected, rtol=0, atol=0)


def test_box_coder_decodes_bf16_deltas_in_float32():
    # autocast's bf16 deltas: boxes come out in float32, not on bf16's grid of 8 pixels beyond 1024
    ref = torch.tensor([[1001.3, 517.7, 1203.9, 781.1]])
    deltas = torch.tensor([[0.1, -0.2, 0.05, 0.3]]).bfloat16()
    box = BoxCoder().decode(deltas, ref)
    assert box.dtype == torch.float32
    torch.testing.assert_close(box, BoxCoder().decode(deltas.float(), ref), rtol=0, atol=0)


def test_box_coder_clamps_large_scale_deltas():
    # a 16x16 anchor with t_w = t_h = 10 would be 16 * e^10 wide; the clamp log(1000/16) caps it at 1000
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = BoxCoder().decode(deltas, anchor)
    torch.testing.assert_close(box, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))  # centre 8, half-size 500
    torch.testing.assert_close(box, tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, anchor))
    assert BoxCoder().clip == math.log(1000 / 16)


def test_clip_and_remove_small_boxes():
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 30.0], [10.0, 10.0, 10.5, 20.0], [90.0, 5.0, 130.0, 9.0]])
    clipped = clip_boxes(boxes, (20, 100))  # (h, w)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 50.0, 20.0], [10.0, 10.0, 10.5, 20.0],
                                                      [90.0, 5.0, 100.0, 9.0]]))
    torch.testing.assert_close(clipped, tv.ops.clip_boxes_to_image(boxes, (20, 100)))
    assert remove_small_boxes(clipped, 1.0).tolist() == [0, 2]  # the 0.5-wide box goes
    assert remove_small_boxes(clipped, 0.5).tolist() == [0, 1, 2]  # sides >= min_size are kept


def test_matcher_hand_worked():
    iou = torch.tensor([[0.9, 0.1, 0.1, 0.0, 0.0],  # gt0: best prediction p0 (0.9, a real match)
                        [0.2, 0.4, 0.4, 0.0, 0.3],  # gt1: best 0.4, tied between p1 and p2
                        [0.0, 0.0, 0.1, 0.2, 0.65],  # gt2: best p4
                        [0.0, 0.0, 0.0, 0.1, 0.6]])  # gt3: best p4 too, but p4 prefers gt2
    # per prediction: best IoU 0.9 -> gt0; 0.4, 0.4, 0.65 are in [0.3, 0.7) -> -2; 0.2 < 0.3 -> -1
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, -2, -2, -1, -2]
    # low-quality matches: p1, p2 (tied best of gt1) -> gt1; p4 (best of gt2 and gt3) -> its own best, gt2
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 1, 1, -1, 2]
    assert Matcher.BELOW_LOW_THRESHOLD == -1 and Matcher.BETWEEN_THRESHOLDS == -2
    with pytest.raises(AssertionError):
        Matcher(0.7, 0.3)(torch.zeros((0, 5)))


@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
def test_matcher_matches_torchvision(allow_low_quality_matches):
    g = torch.Generator().manual_seed(12)
    for i in range(20):
        iou = torch.randint(0, 11, (6, 40), generator=g).float() / 10  # coarse values: many ties and exact thresholds
        if i % 2:
            # a GT overlapping nothing: all predictions tie as its best, at IoU 0, and (as in torchvision, Detectron
            # and Detectron2) each of them keeps its own best match, however low
            iou[5] = 0
        ours = Matcher(0.7, 0.3, allow_low_quality_matches)(iou)
        theirs = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches)(iou)
        assert ours.dtype == torch.int64 and torch.equal(ours, theirs)


def test_balanced_sampler_hand_worked():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1])  # 6 neg, 3 pos, 2 ignored
    sampler = BalancedSampler(4, 0.25)  # -> 1 positive, 3 negatives
    for seed in range(20):
        torch.manual_seed(seed)
        pos, neg = sampler(labels)
        assert pos.numel() == 1 and set(pos.tolist()) <= {6, 7, 8}
        assert neg.numel() == 3 and len(set(neg.tolist())) == 3 and set(neg.tolist()) <= {0, 1, 2, 3, 4, 5}
    # one positive only: negatives fill the batch of 8 up to 7
    pos, neg = BalancedSampler(8, 0.5)(torch.tensor([1] + [0] * 10 + [-1]))
    assert pos.tolist() == [0] and neg.numel() == 7 and 11 not in neg.tolist()
    # too few of both: everything that is not ignored
    pos, neg = BalancedSampler(8, 0.5)(torch.tensor([1, 0, -1, 0]))
    assert pos.tolist() == [0] and sorted(neg.tolist()) == [1, 3]

"""Label Studio: tasks with pre-annotations out, its JSON export back in.

A task's ``data`` holds the image URL and the image's id, run id and score;
its one prediction (``model_version`` the run id) holds the model's verdict as
a ``verdict`` choice (``defect``/``normal``) and, for a flagged image with a
non-empty mask, the mask as a ``defect`` brush region. Brush regions use Label
Studio's RLE (the rle-pack bit stream of an RGBA image, row-major; the mask is
the alpha channel), as its converter's ``brush.encode_rle``/``decode_rle``.

Read back (Label Studio's "JSON" export: a list of tasks with ``annotations``):
the verdict choice is the label (a brush region alone also means defect), the
brush regions' union the mask, ``completed_by`` the reviewer. Cancelled
(skipped) annotations are ignored.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .coco import image_mask
from .reviews import Review, ReviewIndex

IMAGE, VERDICT, BRUSH = "image", "verdict", "defect"
DEFECT, NORMAL = "defect", "normal"
LABEL_CONFIG = f"""<View>
  <Header value="Is there a defect? Paint it."/>
  <Image name="{IMAGE}" value="${IMAGE}" zoom="true"/>
  <Choices name="{VERDICT}" toName="{IMAGE}" choice="single" showInline="true" required="true">
    <Choice value="{DEFECT}"/>
    <Choice value="{NORMAL}"/>
  </Choices>
  <BrushLabels name="{BRUSH}" toName="{IMAGE}">
    <Label value="{DEFECT}" background="#ff0000"/>
  </BrushLabels>
</View>
"""
RLE_SIZES = (3, 4, 8, 16)  # bits of a run length, by the 2-bit index before it
WORD_BITS = 8


# -- Label Studio's brush RLE -----------------------------------------------------------


def encode_brush(mask: np.ndarray) -> list[int]:
    """(h, w) bool mask -> Label Studio brush RLE bytes (RGBA, 255 where the mask is set)."""
    values = np.repeat(mask.astype(np.uint8).ravel() * 255, 4)
    n = values.size
    bits = [f"{n:032b}", f"{WORD_BITS - 1:05b}"] + [f"{s - 1:04b}" for s in RLE_SIZES]
    if n:
        ends = np.append(np.flatnonzero(values[1:] != values[:-1]), n - 1)
        lengths = np.diff(np.append(-1, ends))
        for length, value in zip(lengths.tolist(), values[ends].tolist()):
            while length > 0:
                run = min(length, 1 << RLE_SIZES[-1])
                index = next(k for k, s in enumerate(RLE_SIZES) if run - 1 < (1 << s))
                repeat = "1" if run > 1 else "0"  # a single value is a literal list of one
                bits.append(f"{repeat}{index:02b}{run - 1:0{RLE_SIZES[index]}b}{value:0{WORD_BITS}b}")
                length -= run
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))


def decode_brush(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE -> (height, width) bool mask (alpha channel at least 128).

    ValueError when the stream does not hold ``width * height`` RGBA pixels.
    """
    stream = "".join(f"{int(b):08b}" for b in rle)
    pos = 0

    def read(size: int) -> int:
        nonlocal pos
        if pos + size > len(stream):
            raise ValueError("brush RLE ends early")
        pos += size
        return int(stream[pos - size:pos], 2)

    num = read(32)
    if num != width * height * 4:
        raise ValueError(f"brush RLE holds {num} values, a {width}x{height} RGBA image has {width * height * 4}")
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = min(num, i + 1 + read(sizes[read(2)]))
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3] >= 128


# -- tasks out ----------------------------------------------------------------------------


def task(record: dict, image_url: str) -> dict:
    """One Label Studio task of an exported record, with the model's verdict and mask as its prediction."""
    flagged = bool(record["is_anomalous"])
    result = [{"id": "verdict", "from_name": VERDICT, "to_name": IMAGE, "type": "choices",
               "value": {"choices": [DEFECT if flagged else NORMAL]}}]
    mask = image_mask(record["mask_rle"], record["width"], record["height"]) if flagged else None
    if mask is not None and mask.any():
        result.append({"id": "mask", "from_name": BRUSH, "to_name": IMAGE, "type": "brushlabels",
                       "original_width": record["width"], "original_height": record["height"], "image_rotation": 0,
                       "value": {"format": "rle", "rle": encode_brush(mask), "brushlabels": [DEFECT]}})
    return {"data": {IMAGE: image_url, "image_id": record["image_id"], "image_uri": record["image_uri"],
                     "run_id": record["run_id"], "score": record["score"], "group": record["group"],
                     "reasons": record["reasons"]},
            "predictions": [{"model_version": f"headclip-{record['run_id']}", "score": record["score"],
                             "result": result}]}


# -- the export back in -----------------------------------------------------------------


def _reviewer(annotation: dict) -> Optional[str]:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    return None if who is None else str(who)


def read_label_studio(doc, index: ReviewIndex, source: str, reviewer: Optional[str]) -> None:
    """Add the reviews of a Label Studio JSON export to ``index``; every fault becomes one of its problems."""
    if not isinstance(doc, list) or not all(isinstance(t, dict) and "data" in t for t in doc):
        index.problem(f"{source}: not a Label Studio JSON export (a list of tasks with 'data')")
        return
    for item in doc:
        data = item["data"]
        record = index.find(data.get("image_id"), data.get("image_uri"), data.get(IMAGE))
        if record is None:
            index.problem(f"{source}: task {item.get('id')} names image {data.get('image_id')!r}, not in the export")
            continue
        done = [a for a in item.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            continue  # not reviewed: found by ReviewIndex.missing
        if len(done) > 1:
            index.problem(f"{source}: image {record['image_id']} has {len(done)} annotations in task {item.get('id')}"
                          f"; keep one", record)
            continue
        _annotation(done[0], record, index, source, reviewer)


def _annotation(annotation: dict, record: dict, index: ReviewIndex, source: str, reviewer: Optional[str]) -> None:
    width, height = record["width"], record["height"]
    mask = np.zeros((height, width), bool)
    verdicts: list[str] = []
    for result in annotation.get("result") or []:
        kind, value = result.get("type"), result.get("value") or {}
        if kind == "choices" and result.get("from_name") == VERDICT:
            verdicts.extend(value.get("choices") or [])
        elif kind == "brushlabels" and value.get("rle") is not None:
            size = (result.get("original_width"), result.get("original_height"))
            if size != (width, height):
                index.problem(f"{source}: mask of {record['image_id']} is {size[0]}x{size[1]}, the image is "
                              f"{width}x{height}", record)
                return
            try:
                mask |= decode_brush(value["rle"], width, height)
            except ValueError as err:
                index.problem(f"{source}: mask of {record['image_id']}: {err}", record)
                return
    if len(set(verdicts)) > 1 or (verdicts and verdicts[0] not in (DEFECT, NORMAL)):
        index.problem(f"{source}: image {record['image_id']} has verdict {verdicts}; expected one of "
                      f"{DEFECT!r}, {NORMAL!r}", record)
        return
    label = int(verdicts[0] == DEFECT) if verdicts else int(mask.any())
    if label == 0 and mask.any():
        index.problem(f"{source}: image {record['image_id']} is marked {NORMAL!r} but has a painted defect region",
                      record)
        return
    index.add(Review(record=record, label=label, mask=mask if mask.any() else None,
                     reviewer=_reviewer(annotation) or reviewer,
                     reviewed_at=annotation.get("updated_at") or annotation.get("created_at"), source=source))

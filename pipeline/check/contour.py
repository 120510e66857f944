"""Sub-pixel iso-contours: marching squares giving exactly the longest closed contour that
skimage.measure.find_contours gives, vectorised (skimage is not a runtime dependency)."""

from __future__ import annotations

import numpy as np

# Marching squares as skimage.measure.find_contours runs it (low values fully connected): a cell's
# case has bit 1, 2, 4, 8 set when its upper-left, upper-right, lower-left, lower-right corner lies
# above the level, and its segments run from one side to another with the low values on their
# left. Sides 0-3: top, bottom, left, right; each is the edge from its start to its end corner
# ((row, col) offsets in the cell): along a row for top and bottom, down a column for left and right.
_CELL_SEGMENTS = {1: [(0, 2)], 2: [(3, 0)], 3: [(3, 2)], 4: [(2, 1)], 5: [(0, 1)], 6: [(3, 0), (2, 1)],
                  7: [(3, 1)], 8: [(1, 3)], 9: [(0, 2), (1, 3)], 10: [(1, 0)], 11: [(1, 2)], 12: [(2, 3)],
                  13: [(0, 3)], 14: [(2, 0)]}
_SEGMENT_SIDES = np.zeros((2, 16, 2), np.intp)  # [slot, case] → (from side, to side)
for _case, _segments in _CELL_SEGMENTS.items():
    _SEGMENT_SIDES[: len(_segments), _case] = _segments
_SIDE_START = np.array([(0, 0), (1, 0), (0, 0), (0, 1)])
_SIDE_STEP = np.array([(0, 1), (0, 1), (1, 0), (1, 0)])  # end corner − start corner


def longest_closed_contour(a: np.ndarray, level: float) -> np.ndarray | None:
    """Points (x, y) of the longest iso-contour of `a` at `level`, for an image whose border lies
    above the level (every contour closes): those, in the order and from the start, that
    skimage.measure.find_contours gives (without the repeated end); None under 8 points. Vectorised
    but for the walk along the segments, which costs a fraction of skimage's assembly."""
    h, w = a.shape
    up = (a > np.float64(level)).view(np.uint8)  # compared in double precision, whatever the image's type
    corners = up[:-1] + 4 * up[1:]  # per cell row: the bits of a cell's left corners, its right ones doubled
    case = corners[:, :-1] + 2 * corners[:, 1:]
    cell = np.flatnonzero((case - 1) < 14)  # uint8: the cells neither all below (0) nor all above (15)
    kind = case.ravel()[cell]
    slot = np.zeros(len(cell), np.intp)
    saddle = (kind == 6) | (kind == 9)
    if saddle.any():  # their second segment, processed after all the first ones
        cell, kind = np.concatenate([cell, cell[saddle]]), np.concatenate([kind, kind[saddle]])
        slot = np.concatenate([slot, np.ones(np.count_nonzero(saddle), np.intp)])
    side_from, side_to = _SEGMENT_SIDES[slot, kind].T
    corner = cell + cell // (w - 1)  # the cell's upper-left corner, as a flat index into `a`
    side_corner = _SIDE_START @ (w, 1)  # per side: its start corner's flat offset from the cell's
    side_edge = 2 * side_corner + (np.arange(4) >= 2)  # …and its edge's index (two edges per corner)
    segment_from = np.empty(2 * h * w, np.intp)
    segment_from[2 * corner + side_edge[side_from]] = np.arange(len(cell))
    following = segment_from[2 * corner + side_edge[side_to]].tolist()
    seen, longest, unseen = bytearray(len(cell)), [], len(cell)
    for first in range(len(cell)):
        if unseen <= len(longest):
            break  # no longer chain is left
        if seen[first]:
            continue
        chain, i = [], first
        while not seen[i]:
            seen[i] = 1
            chain.append(i)
            i = following[i]
        unseen -= len(chain)
        if len(chain) > len(longest):
            longest = chain
    if len(longest) < 8:
        return None
    # skimage's contour starts where the segment it met last (cells in raster order) closed it.
    chain = np.asarray(longest)
    last = int(np.argmax((2 * cell + slot)[chain]))
    chain = np.concatenate([chain[last + 1 :], chain[: last + 1]])
    side = side_from[chain]
    start = corner[chain] + side_corner[side]
    step = _SIDE_STEP[side]
    flat = a.ravel()
    v0 = flat[start].astype(np.float64)
    frac = (level - v0) / (flat[start + step @ (w, 1)] - v0)
    rows, cols = np.divmod(start, w)
    return np.column_stack([cols + step[:, 1] * frac, rows + step[:, 0] * frac])

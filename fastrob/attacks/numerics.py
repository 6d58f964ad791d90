"""The attacks' named numerical guards (one home each)."""

# added to a denominator that can be 0 (a zero perturbation, a zero logit gap, a zero gradient):
# the reference implementations' value, far below any nonzero float32 denominator that matters
DIVISION_EPS = 1e-12
# FAB: the least distance to a boundary projection, so that the bias towards x stays defined
FAB_MIN_DISTANCE = 1e-8
# the adversarial-explanation ascent: added to the RMS of its step direction
RMS_EPS = 1e-8

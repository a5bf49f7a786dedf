"""The result type of :func:`fastxent.score`, shared by every backend."""

from typing import Any, NamedTuple


class Score(NamedTuple):
    """Per-row scoring bundle returned by ``score``.

    Every field has the logits' shape minus the class axis. Float fields have
    the loss dtype (float32 for 16-bit logits, else the logits' dtype); arrays
    live where the logits live (numpy or CuPy).

    Attributes
    ----------
    loss : array
        Unreduced sparse softmax cross-entropy ``lse - x[label]``; 0 for an
        ignored row.
    lse : array
        ``logsumexp`` of the row.
    target_logprob : array
        ``x[label] - lse``; NaN for an ignored row.
    entropy : array
        ``-sum_c p_c log p_c`` of the row's softmax.
    argmax : array of int64
        First index of the row's maximum (``np.argmax``).
    correct : array of bool
        ``argmax == label``; False for an ignored row.
    """

    loss: Any
    lse: Any
    target_logprob: Any
    entropy: Any
    argmax: Any
    correct: Any

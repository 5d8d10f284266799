"""The ``code`` values the Veo 3 client puts on the errors it raises.

They are part of the wire contract (a failed generation's ``error.code``), so
a code is never renamed. Retryable ones arrive as
:class:`~nimu_rt.errors.Veo3Retryable`, final ones as
:class:`~nimu_rt.errors.Veo3Final` (or its subclass
:class:`~nimu_rt.errors.SafetyFiltered`)::

    code                         kind       when
    veo3_rate_limited            retryable  429: quota or rate limit
    veo3_unavailable             retryable  5xx, 408; retries used up
    veo3_timeout                 retryable  no answer in time
    veo3_connection_failed       retryable  refused, reset, dropped
    veo3_bad_response            retryable  a 2xx whose body is not the
                                            expected JSON
    veo3_submit_ambiguous        retryable  a submit that Google may have
                                            accepted (500, timeout after
                                            sending, dropped answer): it was
                                            not resent, to avoid paying twice
    veo3_operation_transient     retryable  the operation ended with a
                                            transient error (INTERNAL,
                                            UNAVAILABLE, ...); not billed,
                                            a new submit may work
    veo3_invalid_request         final      400: Veo 3 refused the request
    veo3_precondition_failed     final      400 FAILED_PRECONDITION (billing
                                            not enabled, region)
    veo3_auth_failed             final      401, 403, bad API key, no token
    veo3_payment_required        final      402: prepaid credit used up
    veo3_model_unavailable       final      404 on submit: unknown or retired
                                            model
    veo3_operation_not_found     final      404 on poll, or a malformed name
    veo3_video_not_found         final      404 on download (Google keeps
                                            videos 2 days)
    veo3_operation_failed        final      the operation ended with an error
                                            that a retry will not change
    veo3_no_video                final      done, but neither video nor
                                            safety verdict
    veo3_unsupported             final      something this client cannot do
                                            (e.g. gs:// on the Gemini API)
    veo3_safety_filtered         final      SafetyFiltered: blocked, not
                                            billed; reasons attached
"""

from __future__ import annotations

RATE_LIMITED = "veo3_rate_limited"
UNAVAILABLE = "veo3_unavailable"
TIMEOUT = "veo3_timeout"
CONNECTION_FAILED = "veo3_connection_failed"
BAD_RESPONSE = "veo3_bad_response"
SUBMIT_AMBIGUOUS = "veo3_submit_ambiguous"
OPERATION_TRANSIENT = "veo3_operation_transient"

INVALID_REQUEST = "veo3_invalid_request"
PRECONDITION_FAILED = "veo3_precondition_failed"
AUTH_FAILED = "veo3_auth_failed"
PAYMENT_REQUIRED = "veo3_payment_required"
MODEL_UNAVAILABLE = "veo3_model_unavailable"
OPERATION_NOT_FOUND = "veo3_operation_not_found"
VIDEO_NOT_FOUND = "veo3_video_not_found"
OPERATION_FAILED = "veo3_operation_failed"
NO_VIDEO = "veo3_no_video"
UNSUPPORTED = "veo3_unsupported"
SAFETY_FILTERED = "veo3_safety_filtered"

RETRYABLE = frozenset(
    {
        RATE_LIMITED,
        UNAVAILABLE,
        TIMEOUT,
        CONNECTION_FAILED,
        BAD_RESPONSE,
        SUBMIT_AMBIGUOUS,
        OPERATION_TRANSIENT,
    }
)
FINAL = frozenset(
    {
        INVALID_REQUEST,
        PRECONDITION_FAILED,
        AUTH_FAILED,
        PAYMENT_REQUIRED,
        MODEL_UNAVAILABLE,
        OPERATION_NOT_FOUND,
        VIDEO_NOT_FOUND,
        OPERATION_FAILED,
        NO_VIDEO,
        UNSUPPORTED,
        SAFETY_FILTERED,
    }
)

"""User-facing errors: raised with a one-line message that names the file/row/key and the reason;
``redact`` takes credentials out of any message or stored reference.

One bad *item* raises ``mmpipe.modalities.portable.RejectedInput`` instead (a code and a one-line
reason): it lives in portable.py because the deployment bundle ships that file without this package.
"""

import re


class PipelineError(Exception):
    """A problem with the user's input or configuration; the stage prints it as one line and exits 2."""


# user:password@ in URLs, and the values of query parameters that carry secrets (tokens, API keys,
# pre-signed URL signatures: X-Amz-Signature, X-Goog-Credential, sig=, ...)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]*(?::[^/@\s]*)?@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:[\w.-]*(?:token|key|sig|signature|secret|passw(?:or)?d|credential|auth)"
                           r"[\w.-]*)=)[^&#\s'\"]+?(?=[&#\s'\"]|:\s|$)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URL credentials replaced by ``***``: safe to print, log or store."""
    return _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))

"""User-facing errors: raised with a one-line message that names the file/row/key and the reason."""


class PipelineError(Exception):
    """A problem with the user's input or configuration; the stage prints it as one line and exits 2."""


class RejectedInput(Exception):
    """One modality of one sample (or the whole sample) is unusable.

    ``code`` is a short category counted in metrics; ``message`` says why, for a person.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

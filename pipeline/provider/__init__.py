"""The network seam: the client (the only network code), the limiter, the retry policy and
the redaction of secrets."""

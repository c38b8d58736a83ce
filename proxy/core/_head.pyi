# The C module proxy/core/_head.c (the compiled build only): see its header comment.
from collections.abc import Sequence

def parse(
    raw: bytes, max_lines: int, /
) -> (
    tuple[
        bytes,  # method
        bytes,  # target
        tuple[int, int],  # version
        bytes,  # request_line
        list[bytes],  # lines
        list[bytes],  # names
        list[bytes],  # values
        int | None,  # content_length
        bool,  # chunked
        bool,  # websocket
        bool,  # keep_alive
        bytes | None,  # host
    ]
    | None
): ...
def rewrite(
    request_line: bytes,
    lines: list[bytes],
    names: list[bytes],
    values: list[bytes],
    host: bytes | None,
    websocket: bool,
    keep_alive: bool,
    http10: bool,
    client_ip: str,
    proto: bytes,
    identity_headers: frozenset[bytes],
    add: Sequence[tuple[bytes, bytes]],
    drop_authorization: bool,
    session_cookie: bytes | None,
    /,
) -> bytes | None: ...

"""Names that moved between torch versions, for a machine that brings its own torch (docs/gpu.md).

torch 2.13, the course's pin, calls its tensor collectives `all_gather_single` and `reduce_scatter_single`, and its
FSDP calls them by those names. An older torch (2.11 on the H200 that ran `make gpu-check`) has them only as
`all_gather_into_tensor` and `reduce_scatter_tensor`, so notebook 10 stopped there with an AttributeError.

`install(dist)` gives such a torch the new names, as forwarders that look the old function up on every call (so a
counting wrapper put on the old name sees the course's calls too); `library_name(name)` is the name torch's own
FSDP calls, the one to wrap when counting its traffic. On torch 2.13 both do nothing.
"""

RENAMED = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}


def install(dist) -> None:
    """Add the 2.13 names to an older `torch.distributed` (idempotent; nothing to do on 2.13)."""
    for new, old in RENAMED.items():
        if getattr(dist, new, None) is None:
            def forward(*args, _old=old, **kwargs):
                return getattr(dist, _old)(*args, **kwargs)

            forward.course_forwarder = True
            setattr(dist, new, forward)


def library_name(dist, name: str) -> str:
    """The attribute torch itself calls for the collective the course names `name`."""
    native = getattr(dist, name, None)
    return RENAMED[name] if native is None or getattr(native, "course_forwarder", False) else name

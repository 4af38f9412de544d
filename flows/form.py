"""How the flow's parameters read in the Prefect UI's run form.

The UI labels each choice of a union parameter with the title of the choice's schema
definition, and pydantic titles a block by its class name (``ComfyUIServer``).
:class:`BlockChoice` retitles the block's definition in the flow's parameter schema only
("ComfyUI Server"); the block type's own schema is untouched. The UI still shows a selector of
the saved blocks of that type (the definition keeps its ``block_type_slug``) and selects the
deployment's default ``{"$ref": {"block_document_id": ...}}``.

Prefect's API wraps a block definition so that a ``$ref`` validates, but it finds the
definition by its title; a retitled definition is not wrapped. So the retitled definition
lists no required fields: a ``$ref`` then validates against it as it is. Python callers are
unaffected: pydantic still validates the block itself, ``url`` required.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue

from ..blocks.server import ComfyUIServer, ComfyUIServerPool
from ..blocks.workflow import ComfyUIWorkflow


class BlockChoice:
    """``Annotated[SomeBlock, BlockChoice("Readable title")]``: how a block choice of a union
    parameter is labelled in the UI's run form."""

    def __init__(self, title: str):
        self.title = title

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        reference = handler(schema)
        definition: dict[str, Any] = handler.resolve_ref_schema(reference)
        definition["title"] = self.title
        definition.pop("required", None)
        return reference


#: ``server``: a saved ComfyUI Server or ComfyUI Server Pool block.
ServerParameter = Union[
    Annotated[ComfyUIServer, BlockChoice("ComfyUI Server")],
    Annotated[ComfyUIServerPool, BlockChoice("ComfyUI Server Pool")],
]

#: ``workflow``: a saved ComfyUI Workflow block, or a path to an API-format JSON file.
WorkflowParameter = Union[
    Annotated[ComfyUIWorkflow, BlockChoice("Saved workflow")],
    Annotated[str, Field(title="Workflow file")],
]

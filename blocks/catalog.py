"""How our block types show in Prefect's block catalog and the UI: their logo and docs link."""

#: The logo of every block type of ours (ComfyUI's organisation avatar on GitHub, 256 x 256 px).
LOGO_URL = "https://github.com/Comfy-Org.png?size=256"
#: What the blocks speak to: ComfyUI's server routes.
DOCUMENTATION_URL = "https://docs.comfy.org/development/comfyui-server/comms_routes"

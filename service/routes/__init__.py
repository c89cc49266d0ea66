"""One APIRouter per resource of the gateway's HTTP API."""

"""documents ingested through the gateway

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "documents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("title", sa.String(512), nullable=False, server_default=""),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("chunks", sa.Text, nullable=False),  # JSON list of chunk texts
        sa.Column("meta", sa.Text, nullable=False, server_default="{}"),
        sa.Column("tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("public", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("documents")

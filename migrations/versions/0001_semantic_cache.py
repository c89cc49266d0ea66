"""semantic cache entries, their document dependencies, API keys

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "semantic_entries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("context_fp", sa.String(64), nullable=False, server_default=""),
        sa.Column("model", sa.String(256), nullable=False, server_default=""),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_hit_at", sa.Float, nullable=False),
        sa.Column("hits", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_semantic_tenant_category", "semantic_entries", ["tenant", "category"])
    op.create_index("ix_semantic_last_hit", "semantic_entries", ["tenant", "category", "last_hit_at"])
    op.create_table(
        "semantic_entry_docs",
        sa.Column("entry_id", sa.Integer,
                  sa.ForeignKey("semantic_entries.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("doc_id", sa.String(128), primary_key=True),
    )
    op.create_index("ix_semantic_docs_doc", "semantic_entry_docs", ["doc_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False, server_default=""),
        sa.Column("rate_limit_per_min", sa.Integer, nullable=False, server_default="600"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_semantic_docs_doc", "semantic_entry_docs")
    op.drop_table("semantic_entry_docs")
    op.drop_index("ix_semantic_last_hit", "semantic_entries")
    op.drop_index("ix_semantic_tenant_category", "semantic_entries")
    op.drop_table("semantic_entries")

"""who published a public document (it may delete it; the admin may delete any)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("documents", sa.Column("publisher", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("documents") as b:
        b.drop_column("publisher")

"""ASGI integration: a pure ASGI ``SessionMiddleware`` (``middleware``) plus the
login/logout helpers and FastAPI dependencies (``helpers``)."""

from ..session_dict import SessionDict
from .helpers import (
    CurrentSessionDep,
    CurrentUserDep,
    SessionDep,
    current_session,
    current_user_id,
    install_exception_handler,
    list_user_sessions,
    login,
    logout,
    logout_everywhere,
    require_user,
    revoke_session,
    rotate_session,
    save_session,
    session_data,
    session_error_handler,
    session_expires_at,
    update_session,
)
from .middleware import SCOPE_KEY as SCOPE_KEY  # (the scope key of the connection)
from .middleware import STARLETTE_MARKS_ACCESS as STARLETTE_MARKS_ACCESS
from .middleware import SessionMiddleware

__all__ = [
    "CurrentSessionDep",
    "CurrentUserDep",
    "SessionDep",
    "SessionDict",
    "SessionMiddleware",
    "current_session",
    "current_user_id",
    "install_exception_handler",
    "list_user_sessions",
    "login",
    "logout",
    "logout_everywhere",
    "require_user",
    "revoke_session",
    "rotate_session",
    "save_session",
    "session_data",
    "session_error_handler",
    "session_expires_at",
    "update_session",
]

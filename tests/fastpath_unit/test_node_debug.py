"""NodeDatapath.debug: a view the control plane dumps while the agent works."""

from __future__ import annotations

from unittest import mock

from fastpath import loader
from fastpath.agent_node import NodeDatapath


def test_startup_is_a_copy_of_the_timing_the_agent_still_adds_to() -> None:
    """`timed(node.dp.timing, "apply")` runs after the node is in agent.nodes: a JSON
    dump of the view holding the same dict could see it change size mid-iteration."""
    node = mock.MagicMock()
    node.dp.timing = {"compile": [4.2, 4.1]}
    view = NodeDatapath.debug(node)
    with loader.timed(node.dp.timing, "apply"):
        pass
    with loader.timed(node.dp.timing, "compile"):
        pass
    assert view["startup"] == {"compile": [4.2, 4.1]}
    assert set(node.dp.timing) == {"compile", "apply"}

"""LangChain's own standard test suites (langchain-tests), unmodified, against our adapters.

Each fixture gives an empty store or cache: a fresh namespace per test on the session's nats-server.
No standard test is overridden or skipped (``test_no_overrides_DO_NOT_OVERRIDE`` checks that).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from langchain_tests.integration_tests import (
    AsyncCacheTestSuite,
    BaseStoreAsyncTests,
    BaseStoreSyncTests,
    SyncCacheTestSuite,
)

from botwire_stream.integrations.langchain import BotWireByteStore, BotWireCache

THREE_VALUES = (b"foo \x00\xff bytes", b"", bytes(range(256)))


class TestBotWireByteStoreSync(BaseStoreSyncTests[bytes]):
    @pytest.fixture
    def kv_store(self, url: str, namespace: str) -> Iterator[BotWireByteStore]:
        store = BotWireByteStore(namespace, url=url)
        yield store
        store.close()

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return THREE_VALUES


class TestBotWireByteStoreAsync(BaseStoreAsyncTests[bytes]):
    @pytest.fixture
    async def kv_store(self, url: str, namespace: str) -> AsyncIterator[BotWireByteStore]:
        store = BotWireByteStore(namespace, url=url)
        yield store
        await store.aclose()

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return THREE_VALUES


class TestBotWireCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, url: str, namespace: str) -> Iterator[BotWireCache]:
        cache = BotWireCache(namespace, url=url)
        yield cache
        cache.close()


class TestBotWireCacheAsync(AsyncCacheTestSuite):
    @pytest.fixture
    async def cache(self, url: str, namespace: str) -> AsyncIterator[BotWireCache]:
        cache = BotWireCache(namespace, url=url)
        yield cache
        await cache.aclose()

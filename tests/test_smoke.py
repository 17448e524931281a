from botwire_stream import AsyncMemory, Memory


async def test_async_round_trip(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as memory:
        await memory.set("user:42:history", [{"role": "user", "content": "hi"}])
        assert await memory.get("user:42:history") == [{"role": "user", "content": "hi"}]


def test_sync_round_trip_on_embedded_server(botwire_home: object, namespace: str) -> None:
    with Memory(namespace) as memory:
        memory.set("k", 1)
        assert memory.get("k") == 1

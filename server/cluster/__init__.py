"""What lets several nodes serve as one (REDIS_URL): the Redis link, the shared
Rekognition budget and spend caps, and the Redis-backed recorded-video job queue."""

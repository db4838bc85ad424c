"""Scoring of the example task: the answer counts when it names the capital anywhere."""


def process_results(doc: dict, results: list[str]) -> dict:
    return {"contains_answer": float(doc["capital"].lower() in results[0].lower())}

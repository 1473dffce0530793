"""Zero-initialized vs randomly initialized gates (the paper's zero-init attention ablation)."""
from core.loading import load_model
from train.claims import plot_curves, train_and_evaluate, write_table


def main():
    lm = load_model("smollm2", "float32", "cpu")
    results = [train_and_evaluate(lm, "zero-init gates", "--gate-init", "zero"),
               train_and_evaluate(lm, "random-init gates", "--gate-init", "random")]
    write_table("zero_init", "Zero-initialized vs random gates",
                ["gates", "held-out accuracy", "val loss", "first-step loss", "final loss"],
                [[r["name"], f"{r['accuracy']:.1%}", f"{r['val_loss']:.3f}", f"{r['curve'][0]:.3f}",
                  f"{r['curve'][-1]:.3f}"] for r in results])
    plot_curves("zero_init", "Zero-init vs random-init gates (SmolLM2-135M, K=10, L=30)", results)


if __name__ == "__main__":
    main()
